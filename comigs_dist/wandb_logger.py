"""Weights & Biases as a second home for the scalars TensorBoard gets (``log.wandb``).

Owns one W&B run per user: named ``user_03``, grouped by experiment (``log.wandb_group``, default
the run's out_dir name), job type the method, the resolved config attached, every scalar at the
TensorBoard step, the user's results.json row as the run summary at the end, and the run id kept
under ``<out_dir>/wandb`` so that a resumed run continues the same W&B run. Also owns the check,
made while the configuration is validated, that the client is installed. Knows nothing of
training: ``metrics.build_logger`` builds it next to the TensorBoard writer.
"""
from __future__ import annotations

import json
import re
import secrets
import string
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

INSTALL = 'pip install -e ".[wandb]"'
_BAD_NAME = re.compile(r"[/\\#?%:]")  # characters W&B refuses in project names


def client_problem() -> str | None:
    """Why the wandb client cannot be used here, or None. Imports it: a broken install (often a
    protobuf clash) fails here too, not on every rank after the process groups exist."""
    try:
        import wandb  # noqa: F401
    except ImportError as exc:
        return f"the wandb client is not installed ({exc})"
    except Exception as exc:  # a client that fails while importing is as unusable as a missing one
        return f"the wandb client fails to import ({type(exc).__name__}: {exc})"
    return None


def config_errors(log_cfg) -> list[str]:
    """Problems of the log.wandb* options (config validation: before any process group exists)."""
    if log_cfg.wandb == "off":
        return []
    errors = []
    problem = client_problem()
    if problem:
        errors.append(f"log.wandb ({log_cfg.wandb}) needs the wandb client, but {problem}; install it with "
                      f"`{INSTALL}` (or `pip install wandb`), or set log.wandb=off")
    if not log_cfg.wandb_project or _BAD_NAME.search(log_cfg.wandb_project) or len(log_cfg.wandb_project) > 128:
        errors.append(f"log.wandb_project ({log_cfg.wandb_project!r}) must be 1 to 128 characters without any of "
                      f"/ \\ # ? % :; e.g. log.wandb_project=comigs_dist")
    if log_cfg.wandb_group is not None and not 0 < len(log_cfg.wandb_group) <= 128:
        errors.append(f"log.wandb_group ({log_cfg.wandb_group!r}) must be 1 to 128 characters, or null for the "
                      f"out_dir's name")
    return errors


@dataclass
class WandbOptions:
    """What one user's W&B run needs to know (built by ``options_for``)."""
    mode: str             # online | offline
    project: str
    entity: str | None
    group: str
    job_type: str
    name: str
    config: dict
    out_dir: Path
    user_idx: int
    resumed: bool         # continue the W&B run this user's id file names, if there is one


def options_for(cfg, out_dir: Path, user_idx: int, resumed: bool) -> WandbOptions | None:
    """The W&B run of ``user_idx`` under ``cfg.log`` (None with log.wandb=off)."""
    log = cfg.log
    if log.wandb == "off":
        return None
    out_dir = Path(out_dir)
    return WandbOptions(mode=log.wandb, project=log.wandb_project, entity=log.wandb_entity,
                        group=log.wandb_group or out_dir.resolve().name, job_type=cfg.method,
                        name=f"user_{user_idx:02d}", config={**cfg.to_dict(), "user": user_idx},
                        out_dir=out_dir, user_idx=user_idx, resumed=resumed)


def new_run_id() -> str:
    """A fresh W&B run id: 8 lowercase letters and digits, as W&B makes its own."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def id_file(out_dir: Path, user_idx: int) -> Path:
    return Path(out_dir) / "wandb" / f"user_{user_idx:02d}.id.json"


def _read_id(path: Path) -> dict | None:
    """The stored run of a user, or None (with a warning) when the file cannot be read: the resumed
    attempt then starts a W&B run of its own rather than stopping the training."""
    try:
        stored = json.loads(path.read_text())
        if isinstance(stored, dict) and isinstance(stored.get("id"), str) and stored["id"]:
            return stored
        problem = "it names no run id"
    except (OSError, ValueError) as exc:
        problem = f"{type(exc).__name__}: {exc}"
    print(f"[comigs] warning: {path} cannot be read ({problem}); this attempt starts a new W&B run",
          file=sys.stderr, flush=True)
    return None


class WandbLogger:
    """Scalars of one user to one W&B run, at TensorBoard's steps.

    W&B keeps one history row per step and refuses a step lower than one it has committed, so the
    scalars of a step are gathered here and sent as one row when a later step begins (or at
    ``flush``/``close``): nothing logged at the same step is lost, however many calls it took.
    A step lower than one already sent cannot be stored by W&B; it is reported once on stderr."""

    def __init__(self, opts: WandbOptions):
        import wandb
        from comigs_dist.metrics import write_json_atomic
        self.opts = opts
        (opts.out_dir / "wandb").mkdir(parents=True, exist_ok=True)
        path = id_file(opts.out_dir, opts.user_idx)
        stored = _read_id(path) if opts.resumed and path.is_file() else None
        run_id = stored["id"] if stored else new_run_id()
        settings = wandb.Settings(console="off",        # cluster logs stay as the run prints them
                                  disable_git=True, save_code=False, silent=True)
        try:
            self.run = wandb.init(project=opts.project, entity=opts.entity, group=opts.group,
                                  job_type=opts.job_type, name=opts.name, id=run_id, resume="allow",
                                  config=opts.config, dir=str(opts.out_dir), mode=opts.mode, settings=settings)
        except Exception as exc:
            fix = ("check `wandb login` (or WANDB_API_KEY) and the network, or run with log.wandb=offline and "
                   "upload later with `wandb sync`" if opts.mode == "online" else "see the message above")
            raise RuntimeError(f"log.wandb={opts.mode}: user {opts.user_idx} could not start its W&B run "
                               f"({type(exc).__name__}: {exc}); {fix}") from exc
        if not stored:
            write_json_atomic(path, {"id": run_id, "project": opts.project, "entity": opts.entity,
                                     "group": opts.group, "name": opts.name})
        if opts.user_idx == 0:  # W&B's own banner is silenced on every rank: one line instead
            where = (self.run.url if opts.mode == "online" else None) or \
                f"{opts.out_dir / 'wandb'} (upload with `wandb sync`)"
            print(f"[comigs] W&B ({opts.mode}): group {opts.group!r} of project {opts.project!r}, one run per user; "
                  f"{where}", flush=True)
        self.row: dict[str, float] = {}
        self.row_step: int | None = None
        self.sent_step = -1
        self.warned = False

    def scalar(self, tag: str, value: float, step: int) -> None:
        step = int(step)
        if self.row_step is not None and step != self.row_step:
            self._send()
        if step <= self.sent_step:
            self._warn(tag, step)
            return
        self.row[tag] = float(value)
        self.row_step = step

    def scalars(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.scalar(tag, value, step)

    def text(self, tag: str, text: str, step: int = 0) -> None:
        pass  # the config is attached to the run itself

    def layout(self, layout: dict) -> None:
        pass  # TensorBoard's custom-scalars layout; W&B draws its own panels

    def summary(self, values: dict[str, Any]) -> None:
        from comigs_dist.metrics import _finite
        self.run.summary.update(_finite(values))

    def flush(self) -> None:
        self._send()

    def close(self) -> None:
        import wandb
        self._send()
        self.run.finish()
        # finish() may return before W&B's service has written everything to the run's files; the
        # run is this process's only one, so stop the service now: the files are complete (for a
        # `wandb sync` right after the run) whether or not the exit handlers run later
        wandb.teardown()

    def _send(self) -> None:
        if self.row:
            self.run.log(self.row, step=self.row_step, commit=True)
            self.sent_step = self.row_step
        self.row, self.row_step = {}, None

    def _warn(self, tag: str, step: int) -> None:
        if not self.warned:
            self.warned = True
            print(f"[comigs] warning: user {self.opts.user_idx}: W&B cannot store {tag} at step {step}, before "
                  f"step {self.sent_step} it already holds (W&B steps only increase); TensorBoard has it",
                  file=sys.stderr, flush=True)
