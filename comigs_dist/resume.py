"""Continuing a run: saving one user's full state, agreeing where to resume, restoring it.

Owns what a round checkpoint holds (the trainable parameters, both optimisers and the expert
schedule, both samplers' generators (the data position), the global python/numpy/torch
generators, the step, round and token counters, the evaluation history, the base evaluation,
the communication byte counters, the guard's skip counters and the privacy state: the aggregates
last downloaded, the epsilon curve and the accountant's rounds) and the latest aggregate of each of the
user's groups (what a server hands out again under partial participation), the manifest rank 0 writes once
every user has saved a round, and the checks before training: an output directory every user
can write to with room for a round of checkpoints, and the round to resume from, agreed by all
users. Every decision is taken on gathered facts, so all users raise the same error together
instead of one failing alone while the others wait in a collective.

A resumed run repeats what the uninterrupted run would have done: everything that decides the
next round is restored, so on CPU its parameters and metrics are bit-identical.
Knows nothing of methods or of the round loop itself.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from comigs_dist import checkpoint, dist, faults
from comigs_dist.config import ConfigError
from comigs_dist.data import data_fingerprint

_COUNTERS = ("train_tokens", "train_seconds", "last_loss", "guard_skipped_rounds", "guard_skipped_steps",
             "rounds_taken")


# --------------------------------------------------------------------------------------------
# one user's state
# --------------------------------------------------------------------------------------------

def user_state(run, round_idx: int, latest: dict | None = None) -> dict:
    """Everything that decides this user's next round, in types a weights_only load accepts.
    ``latest``: the latest aggregate of each of the user's groups that the rank's Comm holds
    (``Comm.latest_aggregates``; kept under partial participation), saved so that a resume can
    hand it out again as the uninterrupted run would."""
    return {
        "format": checkpoint.FORMAT, "user": run.user_idx, "round": round_idx, "method": run.cfg.method,
        "config": run.cfg.to_dict(), "step": run.step, "router_step": run.router_step,
        "params": {k: v.detach().cpu() for k, v in run.model.trainable_state().items()},
        # gradients carried into the next round: only under the reference's leak (reference_quirks)
        "pending_grads": {k: p.grad.detach().cpu() for k, p in run.model.report.params.items() if p.grad is not None},
        "expert_opt": run.expert_opt.state_dict() if run.expert_opt else None,
        "expert_sched": run.expert_sched.state_dict() if run.expert_sched else None,
        "router_opt": run.router_opt.state_dict() if run.router_opt else None,
        "train_sampler": run.train_sampler.state_dict(), "router_sampler": run.router_sampler.state_dict(),
        "method_state": run.method.state_dict(run),
        "rng": checkpoint.capture_rng(),
        "counters": {k: getattr(run, k) for k in _COUNTERS},
        "history": list(run.history),
        "train_curve": list(run.train_curve),
        "base": dataclasses.asdict(run.base) if run.base is not None else None,
        "final": dataclasses.asdict(run.final) if run.final is not None else None,  # final.pt only
        "comm": dataclasses.asdict(run.stats),
        "privacy": {**run.privacy,
                    "references": {g: t.detach().cpu() for g, t in run.privacy.get("references", {}).items()}},
        # what a resume must find unchanged: the tokens (meta.json's shard checksums) and, beside
        # the full config above, a digest of the options that change results
        "data": data_fingerprint(run.data.meta),
        "fingerprint": checkpoint.config_fingerprint(run.cfg.to_dict()),
        "group_latest": {g: t.detach().cpu() for g, t in (latest or {}).items()},
    }


def apply_state(run, state: dict) -> None:
    """Put a validated state back into this user's model, optimisers, samplers and counters."""
    from comigs_dist.evaluate import EvalResult
    with torch.no_grad():
        for name, p in run.model.report.params.items():
            p.copy_(state["params"][name].to(device=p.device, dtype=p.dtype))
            pending = (state.get("pending_grads") or {}).get(name)
            p.grad = None if pending is None else pending.to(device=p.device, dtype=p.dtype)
    for key in ("expert_opt", "expert_sched", "router_opt"):
        obj = getattr(run, key)
        # validate() checked the method, so both sides hold the same optimisers
        assert (obj is None) == (state[key] is None), key
        if obj is not None:
            obj.load_state_dict(state[key])
    run.train_sampler.load_state_dict(state["train_sampler"])
    run.router_sampler.load_state_dict(state["router_sampler"])
    run.method.load_state_dict(run, state.get("method_state") or {})  # e.g. HetLoRA's pruned ranks
    run.step, run.router_step = int(state["step"]), int(state["router_step"])
    for key in _COUNTERS:
        if key in state["counters"]:
            setattr(run, key, state["counters"][key])
    run.history = list(state["history"])
    run.train_curve = list(state.get("train_curve", []))  # absent from checkpoints of older versions
    if state["base"] is not None:
        run.base = EvalResult(**state["base"])
    run.final = EvalResult(**state["final"]) if state.get("final") is not None else None
    run.stats.__dict__.update(dataclasses.asdict(dist.CommStats(**state["comm"])))  # the object Comm counts into
    if run.privacy and state.get("privacy"):  # privacy.* is part of the config fingerprint: the same options
        saved = state["privacy"]
        run.privacy = {**saved, "references": {g: t.to(run.device) for g, t in saved["references"].items()}}
    checkpoint.restore_rng(state["rng"])


def checkpoint_bytes(run) -> int:
    """About what one checkpoint of this user takes: the parameters, AdamW's two moments for
    those an optimiser holds, the float64 latest aggregate of its groups (kept under partial
    participation) and a margin for generator states and bookkeeping."""
    params = run.model.report.params.values()
    total = sum(p.numel() * p.element_size() for p in params)
    shared = sum(p.numel() for group in run.shared.values() for _, p in group)
    return 3 * total + 8 * shared + (1 << 20)


def _checkpointing(cfg) -> bool:
    return bool(cfg.checkpoint.every or cfg.checkpoint.final)


# --------------------------------------------------------------------------------------------
# saving (every user at the same round: a collective)
# --------------------------------------------------------------------------------------------

def save(rank, out_dir: Path, name: str, round_idx: int) -> None:
    """Write every user's state as ``name``; once every user of every rank has written (a small
    gather), rank 0 records the round in the manifest and each user prunes to
    ``checkpoint.keep`` rounds. A failed write (disk full) stops every user with the same
    message, with no partial file."""
    topo, cfg = rank.topo, rank.cfg
    mine = []

    def groups_of(user: int) -> list[str]:  # its shared groups and any a method built later (learned groups)
        return [g for g in topo.groups if user in topo.members(g)]
    for run in rank.users:
        user = run.user_idx
        path = checkpoint.user_dir(out_dir, user) / name
        problem, size = None, 0
        try:
            checkpoint.save_atomic(user_state(run, round_idx, rank.comm.latest_aggregates(groups_of(user))), path,
                                   before_publish=lambda run=run: faults.during_checkpoint(run, round_idx))
            size = path.stat().st_size
        except OSError as exc:
            problem = f"user {user}: {exc.strerror or exc}"
        mine.append({"user": user, "file": str(path.relative_to(checkpoint.checkpoints_dir(out_dir))),
                     "bytes": size, "problem": problem})
    entries = sorted((e for part in dist.all_gather_objects(topo, mine) for e in part), key=lambda e: e["user"])
    problems = [e["problem"] for e in entries if e["problem"]]
    if problems:
        raise checkpoint.CheckpointError("; ".join(problems))
    is_round = name == checkpoint.round_file(round_idx)
    if is_round:
        for run in rank.users:
            checkpoint.prune(checkpoint.user_dir(out_dir, run.user_idx), cfg.checkpoint.keep)
    if topo.rank == 0:
        try:
            manifest = checkpoint.read_manifest(out_dir) or {}
        except checkpoint.CheckpointError:
            manifest = {}  # unreadable: rewritten from what every user just reported
        rounds = set(manifest.get("rounds", []))
        if is_round:
            rounds.add(round_idx)
        rounds = sorted(rounds)
        if is_round and cfg.checkpoint.keep:
            rounds = rounds[-cfg.checkpoint.keep:]
        manifest.update({"format": checkpoint.FORMAT, "method": cfg.method, "seed": cfg.seed,
                         "n_users": topo.n_users, "round": max(rounds) if rounds else None, "rounds": rounds,
                         "config_fingerprint": checkpoint.config_fingerprint(cfg.to_dict()),
                         "data_fingerprint": data_fingerprint(rank.users[0].data.meta)["digest"],
                         "restart_count": dist.restart_count(), "written": time.strftime("%Y-%m-%dT%H:%M:%S")})
        manifest["final" if not is_round else "users"] = entries_without_problem(entries)
        if not is_round:  # every user's final.pt is written: a run stopped before results.json resumes from it
            manifest["final_round"] = round_idx  # (restore forgets it when a run trains on instead)
        checkpoint.write_manifest(out_dir, manifest)


def entries_without_problem(entries: list[dict]) -> list[dict]:
    return [{k: v for k, v in e.items() if k != "problem"} for e in entries]


# --------------------------------------------------------------------------------------------
# before training: where to start (every user agrees), and can we write
# --------------------------------------------------------------------------------------------

def _choose_round(cfg, gathered: list[dict], out_dir: Path, manifest_round: int | None,
                  manifest_users: int | None = None) -> tuple[int, str | None]:
    """(round to resume from (0 = fresh), problem) from every user's list of checkpointed rounds.
    Never a silent fresh start: when users disagree so that no round is common to all (one lost
    its files, or sees another disk), or the manifest records rounds no user holds, the run stops
    naming each user and its rounds, whatever ``resume`` says; nor a resume of a run of another
    number of users, or from a round beyond train.rounds."""
    if cfg.resume != "false" and manifest_users is not None and manifest_users != len(gathered):
        return 0, (f"out_dir {out_dir} holds checkpoints of a run of {manifest_users} users "
                   f"({checkpoint.manifest_path(out_dir)}), and this run has {len(gathered)} (n_users, or one "
                   f"user per rank): the number of users cannot change on resume. Resume with n_users="
                   f"{manifest_users}, or start the {len(gathered)}-user run in another out_dir")
    per_user = [set(g["rounds"]) for g in gathered]
    common = set.intersection(*per_user) if per_user else set()
    have = {u: sorted(r) for u, r in enumerate(per_user) if r}
    listing = "; ".join(f"user {u}: rounds {sorted(r)}" if r else f"user {u}: none" for u, r in enumerate(per_user))
    where = checkpoint.checkpoints_dir(out_dir)
    manifest = manifest_round
    if cfg.resume == "false":
        if have:
            return 0, (f"out_dir {out_dir} already holds round checkpoints ({listing}) and resume=false: continue "
                       f"that run with resume=true (or resume=auto), or start a new one in another out_dir")
        return 0, None
    if not have:
        if manifest is not None:
            return 0, (f"{checkpoint.manifest_path(out_dir)} records round {manifest} as complete but no user finds "
                       f"any round checkpoint ({listing}): the files were deleted or lie on a disk the users do not "
                       f"see; restore them, or start a new run in another out_dir")
        if cfg.resume == "true":
            return 0, (f"resume=true but no round was checkpointed by every user in {where} ({listing}); check "
                       f"out_dir, or start with resume=auto (fresh when there is nothing to resume) and "
                       f"checkpoint.every > 0")
        return 0, None
    if not common:
        return 0, (f"cannot resume={cfg.resume} in {out_dir}: the users disagree about the rounds they checkpointed "
                   f"in {where} ({listing}) and no round was checkpointed by every user, so the run can neither "
                   f"resume nor start over without discarding the others' work; restore the missing files (a "
                   f"disk that is not mounted on every node?), or start a new run in another out_dir")
    start = max(common)
    if manifest is not None and manifest > start:
        return 0, (f"{checkpoint.manifest_path(out_dir)} records round {manifest} as complete but not every user "
                   f"still has its file ({listing}): checkpoint files were deleted or are on a disk this user "
                   f"cannot see; restore them, or move the manifest aside to resume from round {start}")
    if start > cfg.train.rounds:
        return 0, (f"out_dir {out_dir} holds this run checkpointed after round {start} ({listing}), and train.rounds="
                   f"{cfg.train.rounds} would end it before that, which a resume cannot do. Nothing was written; "
                   f"pass train.rounds={start} or more, or start a {cfg.train.rounds}-round run in another out_dir")
    return start, None


def _merge_alike(problems: list[str]) -> list[str]:
    """One entry for a problem every user's checkpoint shares (other data, another option), naming
    all the files, instead of the same sentence once per user."""
    grouped: dict[str, list[str]] = {}
    for p in problems:
        head, _, rest = p.partition(" ")
        path, _, rest = rest.partition(" ")
        if head != "checkpoint" or not rest:
            grouped.setdefault(p, [])
            continue
        grouped.setdefault(rest, []).append(path)
    plural = {"was ": "were ", "is ": "are ", "holds ": "hold ", "lacks ": "lack "}

    def verb(rest: str) -> str:
        return next((new + rest[len(old):] for old, new in plural.items() if rest.startswith(old)), rest)
    return [(f"checkpoints {', '.join(files)} {verb(rest)}" if len(files) > 1 else f"checkpoint {files[0]} {rest}")
            if files else rest for rest, files in grouped.items()]


def restore(rank, out_dir: Path, say=lambda msg: None) -> int:
    """Agree with every user where the run starts, check the output directory, and restore the
    rank's users' states when resuming. Returns the number of rounds already done (0 on a fresh
    start). Raises ConfigError on every rank together when something is wrong."""
    cfg, topo = rank.cfg, rank.topo
    out_dir = Path(out_dir)
    manifest = None
    if topo.rank == 0:
        try:
            manifest = checkpoint.read_manifest(out_dir)
            manifest = {k: manifest.get(k) for k in ("round", "n_users", "final_round")} if manifest else None
        except checkpoint.CheckpointError:
            manifest = None  # the per-user files decide; a broken manifest is rewritten at the next save
    mine = {run.user_idx: {"rounds": checkpoint.available_rounds(checkpoint.user_dir(out_dir, run.user_idx)),
                           "final": (checkpoint.user_dir(out_dir, run.user_idx) / "final.pt").is_file(),
                           "bytes": checkpoint_bytes(run)} for run in rank.users}
    parts = dist.all_gather_objects(topo, (manifest, mine))
    manifest = parts[0][0] or {}
    by_user = {u: g for _, part in parts for u, g in part.items()}
    gathered = [by_user[u] for u in range(topo.n_users)]
    # a run stopped after every user wrote final.pt (trained and evaluated) but before results.json
    # continues from there rather than from its last round checkpoint, or from scratch without one
    from_final = (cfg.resume != "false" and rank.method.trains and manifest.get("n_users") == topo.n_users
                  and manifest.get("final_round") == cfg.train.rounds and all(g["final"] for g in gathered))
    if from_final:
        start, problem = cfg.train.rounds, None
    else:
        start, problem = _choose_round(cfg, gathered, out_dir, manifest.get("round"), manifest.get("n_users"))

    problems, states = [], {}
    if problem is None:
        for run in rank.users:
            user, my_dir = run.user_idx, checkpoint.user_dir(out_dir, run.user_idx)
            if _checkpointing(cfg) and run.method.trains and not from_final:  # from final.pt: it writes none
                # conservative: every user's checkpoint may land on the same file system
                need = sum(g["bytes"] for g in gathered)
                what = f"the checkpoint directory of user {user}"
                if (p := checkpoint.check_writable(my_dir, need, what)) is not None:
                    problems.append(p)
            if start:
                path = my_dir / ("final.pt" if from_final else checkpoint.round_file(start))
                try:
                    states[user] = checkpoint.load(path)
                    problems += checkpoint.validate(states[user], path, user, cfg.method, run.model.trainable_state(),
                                                    cfg.to_dict(), data=data_fingerprint(run.data.meta))
                    if from_final and (states[user]["round"] != start or states[user].get("final") is None):
                        problems.append(f"checkpoint {path} is not the final state of round {start} that "
                                        f"{checkpoint.manifest_path(out_dir)} records (round {states[user]['round']}"
                                        f"{'' if states[user].get('final') else ', no final evaluation'}): move it "
                                        f"aside to resume from the last round checkpoint")
                except (checkpoint.CheckpointError, FileNotFoundError) as exc:
                    problems.append(str(exc))
    verdicts = dist.all_gather_objects(topo, problems)
    if problem is not None:
        raise ConfigError(problem)
    all_problems = _merge_alike([p for ps in verdicts for p in ps])
    if all_problems:
        raise ConfigError(f"cannot {'resume' if start else 'start'} the run in {out_dir}: "
                          + "; ".join(all_problems[:8])
                          + ("" if len(all_problems) <= 8 else f"; ... ({len(all_problems)} problems)"))
    for run in rank.users:  # what a writer killed mid-file left (the run holds out_dir's lock)
        checkpoint.remove_partial(checkpoint.user_dir(out_dir, run.user_idx))
    if not from_final and manifest.get("final_round") is not None and topo.rank == 0:
        # this run trains (longer, or afresh): the final.pt files are no run's end any more
        recorded = checkpoint.read_manifest(out_dir) or {}
        recorded.pop("final_round", None)
        checkpoint.write_manifest(out_dir, recorded)
    if not start:
        return 0  # a manifest is never deleted here: _choose_round refused any that describes files
    for run in rank.users:
        apply_state(run, states[run.user_idx])
        # the server's latest aggregates (identical in every member's checkpoint; absent before this format)
        rank.comm.restore_latest(states[run.user_idx].get("group_latest") or {})
    rank.method.after_restore(rank.comm, rank.users)  # every rank together (process groups)
    attempt = dist.restart_count()
    ahead = {u: sorted(r for r in g["rounds"] if r > start) for u, g in enumerate(gathered)}
    ahead_text = "; ".join(f"user {u} also holds rounds {r}" for u, r in ahead.items() if r)
    if from_final:
        say(f"resuming from every user's final.pt in {out_dir}" + (f", attempt {attempt + 1}" if attempt else "")
            + f": the run was trained for {start} rounds and evaluated; writing its results without training or "
              f"evaluating again")
        return start
    say(f"resuming from round {start} (the newest round every user checkpointed) in {out_dir}"
        + (f", attempt {attempt + 1}" if attempt else "")
        + (f" ({ahead_text}, which not every user completed: they are computed again)" if ahead_text else ""))
    return start
