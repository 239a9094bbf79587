"""What a run reports while it runs: one object that owns every tag name, per-user writers, progress.

Owns the metric tags (``train/loss``, ``router/prob/layer_03/expert_1``, ``comm/round_bytes_sent``,
...), the TensorBoard custom-scalars layout built from the same names, one logger per user of the
rank (TensorBoard, W&B, both, or nothing), the progress bars and lines of rank 0, and the
messages it prints. The training loop calls one method per event; it never spells a tag.
Knows nothing of training decisions.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable

from comigs_dist.metrics import NullLogger, build_logger, build_progress

# -- the tags -----------------------------------------------------------------------------------
TRAIN_LOSS, TRAIN_CE, TRAIN_LB = "train/loss", "train/ce", "train/lb"
LR_EXPERT, LR_ROUTER = "lr/expert", "lr/router"
TOKENS_PER_SECOND = "perf/tokens_per_second"
VALID_LOSS = "valid/loss"
BYTES_SENT, BYTES_RECEIVED = "comm/bytes_sent", "comm/bytes_received"
ROUND_BYTES_SENT, ROUND_BYTES_RECEIVED = "comm/round_bytes_sent", "comm/round_bytes_received"
ANALYTIC_ROUND_BYTES = "comm/analytic_round_bytes"
ROUND_SECONDS = "comm/round_seconds"
SKIPPED_ROUNDS, SKIPPED_STEPS = "guard/skipped_rounds", "guard/skipped_steps"
AFTER_TRAINING_LOSS = "after_training/loss"  # a method's stage after the last round (FedDPA-F's fine-tune)


def router_loss_tag(split: str) -> str:
    """The router phase's loss: on validation batches the documented valid/loss; on training
    batches (-tr variants) a tag of its own, so it never collides with the expert phase's."""
    return VALID_LOSS if split == "valid" else f"{split}/router_loss"


def routing_tag(what: str, layer: int, expert: int, prefix: str = "") -> str:
    """``router/prob/layer_03/expert_1`` (mean router probability) or ``router/share/...`` (share of
    routing slots), during training; ``test_router/...`` and ``base_router/...`` at evaluations."""
    head = f"{prefix}_router" if prefix else "router"
    return f"{head}/{what}/layer_{layer:02d}/expert_{expert}"


def eval_tags(prefix: str) -> tuple[str, str]:
    """(loss, perplexity) tags of an evaluation: ``test/...`` or ``base/...``."""
    return f"{prefix}/loss", f"{prefix}/ppl"


def scalar_layout(n_layers: int, n_experts: int, n_generalists: int, routed: bool = True) -> dict:
    """Custom-scalars charts for one user, over the tags above.

    The paper's Figures 3 and 10 plot, per user, the expert score (mean router probability) of
    the generalist and of the specialist against iterations, one curve per layer; here they are
    two charts (generalists, specialists) with one curve per layer, plus one chart per layer
    with every expert of that layer. Figures 4-6 and 9 plot test perplexity against iterations.
    Charts match tags by regular expression (anchored at the start), so the layout is the same
    for every user with the same expert counts and TensorBoard shows it once.
    """
    prob = routing_tag("prob", 0, 0).split("/")[:2]  # ['router', 'prob']

    def experts_regex(ids: list[int]) -> str:
        return rf"{'/'.join(prob)}/layer_\d+/expert_({'|'.join(map(str, ids))})$"
    generalists, specialists = list(range(n_generalists)), list(range(n_generalists, n_experts))
    scores = {}
    for name, ids in (("generalist", generalists), ("specialist", specialists)):
        if ids:
            label = f"expert {ids[0]}" if len(ids) == 1 else f"experts {ids[0]}-{ids[-1]}"
            scores[f"{name} expert score ({label}), one curve per layer"] = ["Multiline", [experts_regex(ids)]]
    layers = {f"layer {layer:02d}: every expert": ["Multiline", [rf"{'/'.join(prob)}/layer_{layer:02d}/expert_\d+$"]]
              for layer in range(n_layers)}
    test_ppl, base_ppl = eval_tags("test")[1], eval_tags("base")[1]
    losses = [TRAIN_LOSS, TRAIN_CE, router_loss_tag("train"), VALID_LOSS, eval_tags("test")[0]]
    return {
        **({"expert scores (paper Fig. 3, 10)": scores, "expert scores by layer": layers} if routed else {}),
        "perplexity (paper Fig. 4-6, 9)": {
            "test perplexity": ["Multiline", [rf"{test_ppl}$", rf"{base_ppl}$"]],
            "losses": ["Multiline", [rf"{t}$" for t in losses]],
        },
        "communication": {"bytes": ["Multiline", [rf"{BYTES_SENT}$", rf"{BYTES_RECEIVED}$"]],
                          "bytes per round, counted and analytic": [
                              "Multiline", [rf"{ROUND_BYTES_SENT}$", rf"{ROUND_BYTES_RECEIVED}$",
                                            rf"{ANALYTIC_ROUND_BYTES}$"]],
                          "seconds in collectives per round": ["Multiline", [rf"{ROUND_SECONDS}$"]]},
    }


FED_TRAIN_LOSS = "federation/train_loss"      # mean over the round's participants
FED_PARTICIPANTS = "federation/participants"  # users that took part in the round
FED_TEST_PPL = "federation/test_ppl"          # mean over every user, at evaluations
FED_EPSILON = "federation/privacy_epsilon"    # privacy.dp=user: epsilon at privacy.delta after the round


def logged_users(spec, n_users: int | None) -> set[int]:
    """The users ``log.users`` gives curves of their own."""
    n = n_users or 0
    if spec == "all":
        return set(range(n))
    if spec == "none":
        return set()
    if spec == "auto":
        return set(range(n)) if n <= 16 else set(range(8))
    return set(int(u) for u in spec)


class Monitor:
    """Everything one rank reports: a logger per user, rank 0's progress, and its messages.

    ``loggers``: user -> logger (a TensorBoard writer under ``<out_dir>/tb/user_XX``, a W&B run,
    both, or a no-op), chosen once; call sites never check whether logging is on."""

    def __init__(self, loggers: dict[int, NullLogger], progress, say: Callable[[str], None] = lambda m: None,
                 every: int = 1):
        self.loggers, self.progress, self.say, self.every = loggers, progress, say, every
        self.federation: NullLogger = NullLogger()  # rank 0's writer of means over the users
        self._round_bar = None
        self._unrouted: set[int] = set()  # users whose experts have no router: no router tags

    @classmethod
    def silent(cls, users: Iterable[int]) -> "Monitor":
        """Reports nothing (benchmarks and tests that drive rounds directly)."""
        from comigs_dist.metrics import NullProgress
        return cls({u: NullLogger() for u in users}, NullProgress())

    @classmethod
    def build(cls, cfg, rank: int, users: Iterable[int], out_dir: Path, resumed_steps: dict[int, int],
              say: Callable[[str], None] = lambda m: None, resumed_round: int = 0, purge: bool = True) -> "Monitor":
        """The monitor of one rank: the loggers of its users that ``log.users`` picks (a resumed
        user's writer drops what the interrupted attempt logged after its checkpoint, unless not
        ``purge``: a run resumed from final.pt logged everything), and on rank 0 progress and the
        federation's writer (means over every user, by round)."""
        from comigs_dist.wandb_logger import options_for
        chosen = logged_users(cfg.log.users, cfg.n_users)
        loggers = {}
        for u in users:
            step = resumed_steps.get(u)
            loggers[u] = (build_logger(out_dir, u, cfg.log.tensorboard, purge_step=step + 1 if step and purge else None,
                                       wandb=options_for(cfg, out_dir, u, resumed=bool(step)))
                          if u in chosen else NullLogger())
        monitor = cls(loggers, build_progress(rank == 0 and cfg.log.progress), say, cfg.log.every)
        if rank == 0 and cfg.log.tensorboard:
            from comigs_dist.metrics import TensorBoardLogger
            monitor.federation = TensorBoardLogger(Path(out_dir) / "tb" / "federation",
                                                   resumed_round + 1 if resumed_round and purge else None)
        return monitor

    def federation_round(self, round_num: int, mean_loss: float, participants: int) -> None:
        """Rank 0: the round's mean training loss over its participants, and how many took part."""
        self.federation.scalars({FED_TRAIN_LOSS: mean_loss, FED_PARTICIPANTS: participants}, round_num)

    def federation_eval(self, round_num: int, mean_ppl: float) -> None:
        self.federation.scalar(FED_TEST_PPL, mean_ppl, round_num)

    def federation_privacy(self, round_num: int, epsilon: float) -> None:
        """Rank 0: the run's epsilon after the round (every user's guarantee, privacy.dp=user)."""
        self.federation.scalar(FED_EPSILON, epsilon, round_num)

    # -- set-up --------------------------------------------------------------------------------
    def start(self, user: int, config_yaml: str | None, n_layers: int, n_experts: int, n_generalists: int,
              routed: bool = True) -> None:
        """``routed`` False (a method without a router: every token averages the experts): no
        router probabilities, load-balancing loss or expert-score charts, which would show a
        constant that no router produced."""
        log = self.loggers[user]
        if not routed:
            self._unrouted.add(user)
        log.layout(scalar_layout(n_layers, n_experts, n_generalists, routed))
        if config_yaml is not None:
            log.text("config", "```\n" + config_yaml + "\n```")

    # -- events --------------------------------------------------------------------------------
    def expert_step(self, user: int, step: int, loss: float, ce: float, lb: float, lr: float,
                    tokens_per_second: float, routing_stats) -> None:
        if step % self.every:
            return
        log = self.loggers[user]
        if user in self._unrouted:
            log.scalars({TRAIN_LOSS: loss, TRAIN_CE: ce, LR_EXPERT: lr, TOKENS_PER_SECOND: tokens_per_second}, step)
            return
        log.scalars({TRAIN_LOSS: loss, TRAIN_CE: ce, TRAIN_LB: lb, LR_EXPERT: lr,
                     TOKENS_PER_SECOND: tokens_per_second}, step)
        for layer, stats in enumerate(routing_stats):
            if stats is None:
                continue
            for j, (p, s) in enumerate(zip(*stats)):
                log.scalar(routing_tag("prob", layer, j), float(p), step)
                log.scalar(routing_tag("share", layer, j), float(s), step)

    def router_phase(self, user: int, step: int, split: str, mean_loss: float, lr: float) -> None:
        self.loggers[user].scalars({router_loss_tag(split): mean_loss, LR_ROUTER: lr}, step)

    def after_training_step(self, user: int, step: int, loss: float) -> None:
        """One optimiser step of the method's stage after the last round; ``step`` continues the
        user's local iterations (the k-th such step is logged at the last iteration + k)."""
        self.loggers[user].scalar(AFTER_TRAINING_LOSS, loss, step)

    def round_end(self, user: int, step: int, stats, before: tuple[int, int, float], analytic_sent: int,
                  skipped_rounds: int, skipped_steps: int) -> None:
        self.loggers[user].scalars({
            BYTES_SENT: stats.bytes_sent, BYTES_RECEIVED: stats.bytes_received,
            ROUND_BYTES_SENT: stats.bytes_sent - before[0], ROUND_BYTES_RECEIVED: stats.bytes_received - before[1],
            ANALYTIC_ROUND_BYTES: analytic_sent, ROUND_SECONDS: stats.seconds - before[2],
            SKIPPED_ROUNDS: skipped_rounds, SKIPPED_STEPS: skipped_steps}, step)

    def evaluation(self, user: int, step: int, res, prefix: str = "test") -> None:
        log = self.loggers[user]
        loss_tag, ppl_tag = eval_tags(prefix)
        log.scalar(loss_tag, res.loss, step)
        log.scalar(ppl_tag, res.ppl, step)
        for layer, (probs, shares) in enumerate(res.routing if user not in self._unrouted else []):
            for j, (p, s) in enumerate(zip(probs, shares)):
                log.scalar(routing_tag("prob", layer, j, prefix), p, step)
                log.scalar(routing_tag("share", layer, j, prefix), s, step)

    # -- progress ------------------------------------------------------------------------------
    def rounds_started(self, total: int, done: int = 0) -> None:
        """A bar over the ``total`` rounds left; a resumed run (``done`` rounds before) says which
        rounds it counts, so that its 2/2 is not read against the log's 'round 4/4'."""
        desc = "rounds" if not done or total <= 0 else f"rounds {done + 1}-{done + total}"
        self._round_bar = self.progress.bar(total=total, desc=desc)

    def round_done(self) -> None:
        if self._round_bar is not None:
            self._round_bar.update(1)

    def rounds_finished(self) -> None:
        if self._round_bar is not None:
            self._round_bar.close()
            self._round_bar = None

    # -- the end -------------------------------------------------------------------------------
    def finish(self, rows: dict[int, dict]) -> None:
        """Each user's results.json row as its run summary; every writer closed."""
        for user, log in self.loggers.items():
            if user in rows:
                log.summary(rows[user])
            log.close()
        self.federation.close()
