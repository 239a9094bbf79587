"""Runs the reference implementation's own ``collab_run.py`` (epfml/CoMiGS) on this project's base
and data, for benchmarks/vs_reference.py.

    python benchmarks/_reference_driver.py run --reference DIR --base CKPT --data DATASET \
        --threads N --control-fds R,W -- <collab_run.py arguments>
    python benchmarks/_reference_driver.py logits --reference DIR --base CKPT --tokens IN.pt --out OUT.pt

Nothing of the reference is copied: its modules are imported from DIR (a checkout the user
provides) and its script runs as it is, with two things swapped:

* hub loading. ``GPT.from_pretrained`` builds GPT-2 124M's shapes and reads GPT-2's weights from
  the Hugging Face hub; here ``transformers.GPT2LMHeadModel.from_pretrained`` returns the
  checkpoint CKPT and the shapes it builds (layers, heads, width, context, vocabulary) are CKPT's,
  so that its own weight copying runs on our base. Its clients read
  ``<data_path>/<n_clients>/{train,valid,test}_<i>.bin`` (uint16 ids): a temporary directory of
  links to our dataset's shards.
* logger. ``wandb`` is a stand-in module that keeps what is logged (``--wandb-log FILE`` writes it
  as JSON lines); progress bars (tqdm) are silent, and the one over its rounds is where this
  driver waits for its turn (``go`` on fd R) and reports each round's clocks on fd W.

``logits`` loads one client's model the way collab_run.py does and saves its logits for a batch
of token ids (the driver's test checks them against the Hugging Face model's).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import runpy
import sys
import tempfile
import time
import types
from pathlib import Path

SPLITS = ("train", "valid", "test")


class DriverError(ValueError):
    """A set-up problem the user can fix; the message names the file or flag and the fix."""


# --------------------------------------------------------------------------------------------
# the pieces (none of them needs the reference)
# --------------------------------------------------------------------------------------------

def check_reference(reference: str | Path) -> Path:
    ref = Path(reference).expanduser().resolve()
    missing = [f for f in ("collab_run.py", "models/model.py", "collab_utils/clients.py") if not (ref / f).is_file()]
    if missing:
        raise DriverError(f"--reference {ref} is not a checkout of epfml/CoMiGS (missing {', '.join(missing)}); "
                          f"clone https://github.com/epfml/CoMiGS and pass its directory")
    return ref


def link_dataset(dataset: str | Path, n_clients: int, out: str | Path) -> Path:
    """The layout the reference's clients read, as links to a prepared dataset's shards:
    ``out/<n_clients>/<split>_<i>.bin`` -> ``dataset/user_<i>/<split>.bin``. Returns the
    directory to pass as -data_path."""
    dataset = Path(dataset)
    meta_path = dataset / "meta.json"
    if not meta_path.is_file():
        raise DriverError(f"--data {dataset} has no meta.json: give a dataset prepared by "
                          f"`python -m comigs_dist.data prepare` (or the benchmark's random one)")
    meta = json.loads(meta_path.read_text())
    if meta.get("dtype") != "uint16":
        raise DriverError(f"--data {dataset} stores token ids as {meta.get('dtype')}, but the reference reads "
                          f"uint16 only; use a dataset whose vocabulary is at most 65,536 tokens")
    if int(meta.get("n_users", 0)) < n_clients:
        raise DriverError(f"--data {dataset} holds {meta.get('n_users')} users, fewer than the reference's "
                          f"{n_clients} clients (-nc); prepare it for at least {n_clients} users")
    root = Path(out)
    target = root / str(n_clients)
    target.mkdir(parents=True, exist_ok=True)
    for user in range(n_clients):
        for split in SPLITS:
            link = target / f"{split}_{user}.bin"
            if not link.exists():
                link.symlink_to((dataset / meta["users"][user]["splits"][split]["file"]).resolve())
    return root


def checkpoint_shapes(config) -> dict:
    """The reference's GPTConfig fields that a Hugging Face GPT-2 config fixes."""
    return {"n_layer": config.n_layer, "n_head": config.n_head, "n_embd": config.n_embd,
            "block_size": config.n_positions, "vocab_size": config.vocab_size}


def wandb_stand_in(records: list) -> types.ModuleType:
    """A module with wandb's calls the reference makes; it keeps what is logged in ``records``."""
    module = types.ModuleType("wandb")
    module.init = lambda *args, **kwargs: records.append({"init": kwargs.get("config", {})})
    module.log = lambda metrics, *args, **kwargs: records.append({"log": metrics})
    module.finish = lambda *args, **kwargs: None
    return module


def usage() -> dict[str, float]:
    r = resource.getrusage(resource.RUSAGE_SELF)  # every thread of this process
    return {"wall": time.perf_counter(), "user": r.ru_utime, "sys": r.ru_stime, "minflt": float(r.ru_minflt)}


class RoundGate:
    """Wraps the reference's loop over rounds: before each round it says ``ready`` and waits
    for ``go``; after it, it reports the round's wall and CPU seconds (JSON lines)."""

    def __init__(self, inbox, outbox, clock=usage):
        self.inbox, self.outbox, self.clock = inbox, outbox, clock

    def send(self, message: dict) -> None:
        self.outbox.write(json.dumps(message) + "\n")
        self.outbox.flush()

    def __call__(self, iterable):
        for i, item in enumerate(iterable):
            self.send({"event": "ready", "round": i})
            line = self.inbox.readline()
            if not line:  # the controller went away
                raise SystemExit("reference driver: the benchmark closed the control pipe")
            before = self.clock()
            yield item
            now = self.clock()
            self.send({"event": "round", "round": i, **{k: now[k] - before[k] for k in now}})


def quiet_tqdm(gate):
    """tqdm for the reference: its round loop (in collab_run.py, run as __main__) goes through the
    gate; every other bar (local steps, evaluation) is a plain, silent iteration."""
    def tqdm(iterable=None, *args, **kwargs):
        if gate is not None and sys._getframe(1).f_globals.get("__name__") == "__main__":
            return gate(iterable)
        return iterable
    return tqdm


def install_swaps(reference: Path, base: str | Path, records: list, gate=None) -> None:
    """Make the reference load ``base`` instead of the hub, log into ``records``, and pace its
    rounds through ``gate``. Call before importing any of the reference's modules."""
    import tqdm as tqdm_module
    import transformers
    from transformers import GPT2LMHeadModel
    base = str(base)
    shapes = checkpoint_shapes(transformers.AutoConfig.from_pretrained(base))
    sys.path.insert(0, str(reference))
    sys.modules["wandb"] = wandb_stand_in(records)
    tqdm_module.tqdm = quiet_tqdm(gate)
    # GPT.from_pretrained imports GPT2LMHeadModel from transformers when it runs and loads the
    # name it is given from the hub: the class's loader reads our checkpoint instead (patched on
    # the class, which transformers' lazy module wrappers all hand out)
    load = GPT2LMHeadModel.from_pretrained
    GPT2LMHeadModel.from_pretrained = staticmethod(lambda name, *args, **kwargs: load(base))
    import models.model as ref_model
    real_config = ref_model.GPTConfig
    ref_model.GPTConfig = lambda **fields: real_config(**{**fields, **shapes})


# --------------------------------------------------------------------------------------------
# commands
# --------------------------------------------------------------------------------------------

def run(args, script_args: list[str]) -> None:
    import torch
    torch.set_num_threads(args.threads)
    reference = check_reference(args.reference)
    r_fd, w_fd = (int(x) for x in args.control_fds.split(","))
    gate = RoundGate(os.fdopen(r_fd, "r"), os.fdopen(w_fd, "w"))
    records: list = []
    install_swaps(reference, args.base, records, gate)
    n_clients = int(_flag(script_args, ("-nc", "--num_clients"), "4"))
    with tempfile.TemporaryDirectory(prefix="reference-data-") as links:
        data_path = link_dataset(args.data, n_clients, links)
        sys.argv = [str(reference / "collab_run.py"), *script_args, "-data_path", str(data_path)]
        runpy.run_path(str(reference / "collab_run.py"), run_name="__main__")
    if args.wandb_log:
        Path(args.wandb_log).write_text("".join(json.dumps(r, default=float) + "\n" for r in records))
    gate.send({"event": "done"})


def logits(args) -> None:
    """One client's model as collab_run.py builds it (GPT.from_pretrained + get_ft_model): its
    logits for the token ids in --tokens, the names of its trainable parameters and its config,
    saved to --out."""
    import torch
    reference = check_reference(args.reference)
    install_swaps(reference, args.base, [])
    from collab_utils.collaboration_strategies import to_collaboration_strategy
    from models.lora import get_ft_model
    from models.model import GPT
    override = dict(expert_num=2, lora_rank=8, lora_dropout=0.0, topk_exp=2, load_balancing_lambda=0.01,
                    pruning_lambda=0.01, pruning_strength=0.99, pruning=False, expert0_importance=0.5,
                    is_no_router=False, device="cpu")
    model = get_ft_model(GPT.from_pretrained("gpt2", override), to_collaboration_strategy("expert_0"))
    tokens = torch.load(args.tokens)
    with torch.no_grad():
        out, _, _ = model(tokens, targets=tokens)  # with targets its forward returns every position
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    torch.save({"logits": out, "trainable": trainable, "config": vars(model.config)}, args.out)


def _flag(argv: list[str], names: tuple[str, ...], default: str) -> str:
    for i, a in enumerate(argv[:-1]):
        if a in names:
            return argv[i + 1]
    return default


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    script_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, script_args = argv[:cut], argv[cut + 1:]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run")
    p_run.add_argument("--reference", required=True)
    p_run.add_argument("--base", required=True)
    p_run.add_argument("--data", required=True)
    p_run.add_argument("--threads", type=int, default=1)
    p_run.add_argument("--control-fds", required=True, help="R,W: file descriptors of the control pipes")
    p_run.add_argument("--wandb-log", default="", help="write what the reference logged to this file")
    p_logits = sub.add_parser("logits")
    p_logits.add_argument("--reference", required=True)
    p_logits.add_argument("--base", required=True)
    p_logits.add_argument("--tokens", required=True)
    p_logits.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    try:
        if args.command == "run":
            run(args, script_args)
        else:
            logits(args)
    except DriverError as e:
        print(f"reference driver: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
