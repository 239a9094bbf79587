"""CoMiGS with learned sharing groups, in the spirit of FedLEASE (Wang, Bian, Zhang, Xu; NeurIPS
2025): after a warm-up, users are clustered by the similarity of their generalist updates and
each cluster averages a generalist of its own.

Warm-up: plain CoMiGS-1G1S (the generalists and the attention LoRA averaged over every user) for
``warmup_rounds`` rounds. Each user adds up its local update of the generalist experts' LoRA
factors over those rounds (the values just before each sync minus the aggregate it started the
round from). At the sync that opens round ``warmup_rounds``: the update vectors are gathered
(``Comm.gather``, counted), clustered by ``groups_learned.compute_learned_groups`` (cosine
similarity averaged over tensors, so every layer counts alike; the number of groups by the
largest eigengap of the normalised Laplacian, FedLEASE's best silhouette, or given; average-linkage
partition), the lowest user's decision broadcast (BLAS rounding may differ between hosts), one
process group built per cluster (``learned_<i>``, every rank in sorted order) and, from this
sync on, each cluster's generalist experts are averaged over its members (the first mean: each
cluster starts from its members' mean) while the attention LoRA stays averaged over every user
(``attention='global'``, the paper always shares it) or also per cluster (``'cluster'``).
One group found, or ``k=1``: the base class's sync every round, i.e. CoMiGS-1G1S bit for bit
(only the one gather of the switch round is added to the bytes). Privacy is refused before any
work: that gather moves the users' updates in the clear.

What was read: FedLEASE's README and its released code at lei-wang-link/FedLEASE cf18cd6 (the
server's clustering, the client loop and its LoRA layer); the paper itself was out of reach from
where this was written. What differs from FedLEASE (docs/methods-since-the-paper.md): FedLEASE warms up without sharing,
clusters the LoRA B matrices and then gives every user one expert per cluster with an adaptive
top-M router; here the CoMiGS architecture stays (one generalist, one specialist, the router) and
only who averages the generalist with whom is learned, which is what ``comm.groups`` sets by hand.
A method of its own rather than a ``comm.groups=learned`` value: one file and one YAML, its
options typed and checked with the method's, and no change to the base class's sync that every
method inherits. The groups are written to results.json (``learned_groups``) and printed by the
rank of user 0.

Partial participation: a user's update is what it trained since its last download, added up at
each download (and at the switch, for what it trained but has not downloaded over yet), so a user
counts every warm-up round it took part in whether or not it is drawn again before the switch.
Every user must take part in at least one warm-up round (a user never drawn has no update to be
placed by): the draw is known from the seed, so a configuration that leaves one out is refused
before the run starts, naming the shortest warm-up that draws everyone. A cluster none of whose
members trained in the round before the switch starts from the generalists' latest global
aggregate (what its members would otherwise have downloaded).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from comigs_dist.dist import collectives
from comigs_dist.groups import DEFAULT_GROUP
from comigs_dist.guard import nonfinite_shared
from comigs_dist.groups_learned import RULES, compute_learned_groups
from comigs_dist.methods.base import AlternatingOptions, register_method
from comigs_dist.methods.comigs import CoMiGS1G1S
from comigs_dist.options import opt


@dataclass
class LearnedGroupsOptions(AlternatingOptions):
    warmup_rounds: int = opt(4, "Rounds of plain CoMiGS before the users are clustered (a fifth of the run, as "
                             "FedLEASE's 5 of 25); must be below train.rounds.")
    rule: Literal["eigengap", "silhouette"] = opt("eigengap", "How the number of groups is chosen: the largest "
                                                  "eigengap (can answer one group) or FedLEASE's best silhouette "
                                                  "(2..max_k groups).")
    k: int = opt(0, "A fixed number of groups (1 = plain CoMiGS); 0 = chosen by the rule.")
    max_k: int = opt(0, "The most groups the rule considers; 0 = users - 1 (FedLEASE: 4).")
    attention: Literal["global", "cluster"] = opt("global", "The attention LoRA after the switch: averaged over "
                                                  "every user (global) or within each group (cluster).")


@dataclass
class LearnedState:
    """What the method keeps for one user: where its generalist experts sit in its shared group,
    their values after the last sync and the summed updates (warm-up), then the groups."""
    features: list[int]                  # indices in user.shared['generalists'] of generalist-expert tensors
    attention: list[int]                 # indices of the attention LoRA's tensors
    anchor: list[torch.Tensor] | None = None
    update: list[torch.Tensor] | None = None
    groups: list[list[int]] | None = None
    summary: dict | None = None


def group_name(i: int) -> str:
    return f"learned_{i:03d}"  # zero-padded: sorted names are the groups' order


@register_method("comigs_learned")
class CoMiGSLearned(CoMiGS1G1S):
    description = ("CoMiGS with learned sharing groups: after a warm-up, users clustered by their generalist "
                   "updates, one generalist per cluster")
    paper_row = "in the spirit of FedLEASE, Wang et al., NeurIPS 2025 (since the paper)"
    Options = LearnedGroupsOptions
    accepts_comm_groups = False  # the groups are learned
    refuses_privacy = ("the round that forms the groups gathers every user's summed warm-up update of its "
                       "generalists (Comm.gather) in the clear to cluster them; privacy.dp and privacy.secure_agg "
                       "protect the means of the shared groups only")

    @classmethod
    def config_errors(cls, cfg) -> list[str]:
        o, t = cls(cfg).options, cfg.train
        errors = []
        if not 1 <= o.warmup_rounds < t.rounds:
            errors.append(f"method_options.warmup_rounds ({o.warmup_rounds}) must be >= 1 and below train.rounds "
                          f"({t.rounds}): the groups are learned after the warm-up and used in the rounds after it; "
                          f"lower it or raise train.rounds")
        if o.k < 0 or o.max_k < 0:
            errors.append(f"method_options.k ({o.k}) and max_k ({o.max_k}) must be >= 0 (0 = chosen / every count)")
        if cfg.n_users is not None and o.k > cfg.n_users:
            errors.append(f"method_options.k ({o.k}) must be <= n_users ({cfg.n_users})")
        if o.rule not in RULES:
            errors.append(f"method_options.rule ({o.rule!r}) must be one of {', '.join(RULES)}")
        return errors

    @classmethod
    def participation_errors(cls, cfg, n_users: int, draw) -> list[str]:
        """Under partial participation, every user must train in one of the warm-up's rounds."""
        warmup = cls(cfg).options.warmup_rounds
        drawn, first_all, missing = set(), None, []
        for r in range(cfg.train.rounds):
            drawn |= draw(r)
            if r + 1 == warmup:
                missing = sorted(set(range(n_users)) - drawn)
            if first_all is None and len(drawn) == n_users:
                first_all = r + 1
            if r + 1 >= warmup and first_all is not None:
                break
        if not missing:
            return []
        shown = ", ".join(map(str, missing[:10])) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        fix = (f"set method_options.warmup_rounds={first_all} (the first {first_all} rounds draw every user; it must "
               f"stay below train.rounds={cfg.train.rounds})" if first_all is not None and first_all < cfg.train.rounds
               else "raise train.participation or train.users_per_round, or train.rounds with warmup_rounds")
        return [f"method_options.warmup_rounds ({warmup}): under partial participation (train.participation="
                f"{cfg.train.participation}, train.users_per_round={cfg.train.users_per_round}) user(s) {shown} take "
                f"part in none of the warm-up's rounds, so there is no update to place them by; {fix}"]

    def prepare_user(self, user) -> None:
        params = user.shared.get(DEFAULT_GROUP, [])
        tags = user.model.report.tags
        user.method_state = LearnedState(features=[i for i, (n, _) in enumerate(params) if tags[n].kind == "expert"],
                                         attention=[i for i, (n, _) in enumerate(params) if tags[n].kind == "attn"])

    # -- the rounds ------------------------------------------------------------------------------
    @torch.no_grad()
    def sync(self, ctx) -> None:
        groups = ctx.users[0].method_state.groups
        switch = groups is None and ctx.round_idx == self.options.warmup_rounds
        if groups is None and ctx.round_idx > 0:
            for u in ctx.users:
                # what it trained since its last download, before this round's download replaces it
                # (at the switch every user's, downloading or not); non-finite values (a user the
                # guard sets aside) add nothing
                if (ctx.downloads(u) or switch) and not nonfinite_shared(u.shared):
                    self._add_update(u)
            if switch:
                groups = self._learn_groups(ctx)
        if groups is None or len(groups) == 1:
            super().sync(ctx)  # the warm-up, or one group: plain CoMiGS
            if groups is None:
                for u in ctx.users:
                    st = u.method_state
                    st.anchor = [t.detach().clone() for t in self._features(u)]
            return
        self._build_groups(ctx.comm, groups)
        if switch:
            self._seed_latest(ctx, groups)
        label = {v: i for i, members in enumerate(groups) for v in members}
        everyone = DEFAULT_GROUP
        if self.options.attention == "global":
            ctx.comm.mean(everyone, {u.user_idx: self._attention(u) for u in ctx.users}, skip=ctx.skip)
        for i in sorted({label[u.user_idx] for u in ctx.users}):  # sorted group order on every rank
            mine = [u for u in ctx.users if label[u.user_idx] == i]
            tensors = {u.user_idx: (self._features(u) if self.options.attention == "global"
                                    else [p.data for _, p in u.shared[everyone]]) for u in mine}
            ctx.comm.mean(group_name(i), tensors, skip=ctx.skip)

    def _seed_latest(self, ctx, groups: list[list[int]]) -> None:
        """The latest aggregates of the groups after the switch, cut from the last global one
        (none when no contributor counts travel: full participation keeps none):
        each cluster's is its payload's part (the generalists, or with attention='cluster' every
        shared tensor), and the global group's the attention LoRA's. Handed out only where no
        member of a group uploaded in this round (partial participation); any upload replaces it."""
        latest = ctx.comm.latest_aggregates([DEFAULT_GROUP]).get(DEFAULT_GROUP)
        if latest is None:
            return
        st = ctx.users[0].method_state
        bounds = torch.tensor([0] + [p.numel() for _, p in ctx.users[0].shared[DEFAULT_GROUP]]).cumsum(0).tolist()

        def part(indices: list[int]) -> torch.Tensor:
            return torch.cat([latest[bounds[i]:bounds[i + 1]] for i in indices])
        cluster = part(st.features) if self.options.attention == "global" else latest
        seeds = {group_name(i): cluster.clone() for i in range(len(groups))}
        if self.options.attention == "global":
            seeds[DEFAULT_GROUP] = part(st.attention)
        ctx.comm.restore_latest(seeds)

    def payloads(self, user, round_idx: int | None = None) -> dict:
        """After the switch: the generalists in the user's group and the attention LoRA in the
        global one (attention='global'), or every shared tensor in the user's group. The switch
        round's sync gathers every user's update of the generalists first (N payloads each way in
        comm.dtype, whatever comm.mode says)."""
        st = user.method_state
        if st.groups is None or len(st.groups) == 1:
            out = super().payloads(user, round_idx)
        else:
            i, members = next((i, m) for i, m in enumerate(st.groups) if user.user_idx in m)
            if self.options.attention == "cluster":
                out = {group_name(i): (sum(n for n, _ in super().payloads(user).values()), members)}
            else:
                out = {DEFAULT_GROUP: (sum(t.numel() for t in self._attention(user)), None),
                       group_name(i): (sum(t.numel() for t in self._features(user)), members)}
        if st.groups is not None and round_idx == self.options.warmup_rounds:
            gather = (sum(t.numel() for t in self._features(user)), None, "all2all")
            out[DEFAULT_GROUP] = collectives(out[DEFAULT_GROUP]) + [gather] if DEFAULT_GROUP in out else gather
        return out

    def _features(self, user) -> list[torch.Tensor]:
        params = user.shared[DEFAULT_GROUP]
        return [params[i][1].data for i in user.method_state.features]

    def _attention(self, user) -> list[torch.Tensor]:
        params = user.shared[DEFAULT_GROUP]
        return [params[i][1].data for i in user.method_state.attention]

    def _add_update(self, user) -> None:
        st = user.method_state
        step = [t.detach() - a for t, a in zip(self._features(user), st.anchor)]
        st.update = step if st.update is None else [s + d for s, d in zip(st.update, step)]

    def _learn_groups(self, ctx) -> list[list[int]]:
        """Gather every user's summed update, cluster, and take the decision of the group's first
        member (the same on every rank); recorded in every user's state."""
        o = self.options
        comm = ctx.comm
        payload = {}
        for u in ctx.users:
            st = u.method_state
            payload[u.user_idx] = st.update if st.update is not None else [torch.zeros_like(t) for t in st.anchor]
        with comm.everyone_takes_part():  # every user's update, whether it takes part in the round or not
            vectors = comm.gather(DEFAULT_GROUP, payload)
        first = ctx.users[0]
        blocks = [t.numel() for t in self._features(first)]
        learned = compute_learned_groups(torch.stack(vectors), k=o.k or None, rule=o.rule, max_k=o.max_k or None,
                                         blocks=blocks)
        labels = {u.user_idx: [torch.tensor(learned.labels(), dtype=torch.float32, device=first.device)]
                  for u in ctx.users}
        comm.broadcast(DEFAULT_GROUP, labels, start=False)  # the lowest user's decision wins (no counted payload)
        decided = [int(v) for v in next(iter(labels.values()))[0].tolist()]
        groups = [[v for v, g in enumerate(decided) if g == i] for i in range(max(decided) + 1)]
        summary = {"after_round": ctx.round_idx, **learned.summary(), "groups": groups}
        for u in ctx.users:
            st = u.method_state
            st.groups, st.summary, st.anchor, st.update = groups, summary, None, None
        if 0 in {u.user_idx for u in ctx.users}:
            scores = ", ".join(f"{k}: {v:.4f}" for k, v in summary["scores"].items())
            print(f"learned sharing groups after round {ctx.round_idx}: {groups} "
                  f"(rule {summary['rule']}{'; scores ' + scores if scores else ''})", flush=True)
        return groups

    def after_restore(self, comm, users: list) -> None:
        """A run resumed past the switch: the clusters' process groups, before anything (the
        results of a run resumed from final.pt, which syncs no more) names them."""
        groups = users[0].method_state.groups
        if groups is not None and len(groups) > 1:
            self._build_groups(comm, groups)

    def _build_groups(self, comm, groups: list[list[int]]) -> None:
        """The clusters' process groups, built once on every rank (at the switch, or after a
        resume past it: ``after_restore``)."""
        wanted = {group_name(i): members for i, members in enumerate(groups)}
        missing = {name: members for name, members in wanted.items() if name not in comm.topo.groups}
        if missing:
            comm.topo.build_groups(missing)

    # -- checkpoints and results -------------------------------------------------------------------
    def state_dict(self, user) -> dict:
        st = user.method_state
        out = {}
        if st.anchor is not None:
            out["anchor"] = [t.detach().clone() for t in st.anchor]
        if st.update is not None:
            out["update"] = [t.detach().clone() for t in st.update]
        if st.groups is not None:
            out["groups"] = [list(g) for g in st.groups]
            out["summary"] = st.summary
        return out

    def load_state_dict(self, user, state: dict) -> None:
        """From a checkpoint (a fresh state), or train.sync putting back a user that sat the round
        out: then the groups learned in this very sync stay (they belong to the federation, not
        to the user), and so does the end of the warm-up's bookkeeping."""
        st = user.method_state
        if "groups" in state:
            st.groups = [list(map(int, g)) for g in state["groups"]]
            st.summary = state.get("summary")
        if st.groups is None:
            st.anchor = [t.to(user.device) for t in state["anchor"]] if "anchor" in state else None
            st.update = [t.to(user.device) for t in state["update"]] if "update" in state else None

    def results(self, user) -> dict:
        return {"learned_groups": user.method_state.summary}
