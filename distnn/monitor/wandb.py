"""Weights & Biases: online where credentials exist, offline elsewhere; never a prompt.

`log.wandb.mode`:
- `auto` (default): online when credentials exist (WANDB_API_KEY, WANDB_IDENTITY_TOKEN_FILE or
  a netrc entry for the W&B host, as `wandb login` writes), offline otherwise. WANDB_MODE, when
  set, decides instead.
- `online`: wandb.init waits at most `log.wandb.init_timeout_s` for the server; when it cannot
  be reached the run logs offline instead, with a note.
- `offline`: everything goes to `<run dir>/wandb/offline-run-<time>-<id>/`; the note printed at
  start gives the `wandb sync` command that uploads it later from a machine with internet.
- `disabled`: wandb is not even imported.

The run id lives in `<run dir>/wandb_id`: a job that resumes from a checkpoint (a requeue, a
restart) continues the same W&B run (`resume="allow"`). Every record goes in at `step=` the
optimizer step; the steps a resumed job replays between its checkpoint and the last step W&B
holds from the earlier attempt are not sent again, so W&B's steps only increase (those a
killed attempt's W&B service had not written are sent again). A run that starts from
step 0 starts a new W&B run.
"""

from __future__ import annotations

import math
import netrc
import os
import re
import secrets
import string
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import torch
from torch import nn

from distnn import config as config_lib
from distnn import fsio
from distnn.config import Config

ID_FILE = "wandb_id"
# W&B's API hosts: the SaaS one, and the CoreWeave Forge front that wandb >= 0.26 defaults to.
DEFAULT_HOSTS = ("api.wandb.ai", "api.forge.coreweave.com")


def _netrc_path(environ: Mapping[str, str]) -> Path:
    if environ.get("NETRC"):
        return Path(environ["NETRC"]).expanduser()
    home = Path(environ.get("HOME") or Path.home())
    for name in (".netrc", "_netrc"):
        if (home / name).exists():
            return home / name
    return home / ".netrc"


def has_credentials(environ: Mapping[str, str] | None = None) -> bool:
    """Whether wandb would find credentials without prompting: WANDB_API_KEY,
    WANDB_IDENTITY_TOKEN_FILE, or a netrc entry for the W&B host (`wandb login`)."""
    env = os.environ if environ is None else environ
    if env.get("WANDB_API_KEY") or env.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    hosts = set(DEFAULT_HOSTS)
    if env.get("WANDB_BASE_URL"):
        parts = urlsplit(env["WANDB_BASE_URL"])
        hosts |= {parts.netloc, parts.hostname or ""}
    try:
        entries = netrc.netrc(str(_netrc_path(env))).hosts
    except (OSError, netrc.NetrcParseError):
        return False
    return any(entries.get(host, (None, None, None))[2] for host in hosts if host)


def resolve_mode(mode: str, environ: Mapping[str, str] | None = None) -> str:
    """online | offline | disabled for a configured mode (auto decides here)."""
    env = os.environ if environ is None else environ
    if mode != "auto":
        return mode
    forced = env.get("WANDB_MODE", "").strip().lower()
    if forced in ("online", "offline", "disabled"):
        return forced
    if forced == "dryrun":
        return "offline"
    return "online" if has_credentials(env) else "offline"


def new_run_id() -> str:
    """8 random base-36 characters, the shape of wandb's own ids."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _offline_last_step(current: Path) -> int:
    """The last step in the offline files of this run's earlier attempts (-1: none)."""
    from distnn.monitor import wandb_reader

    run_id = current.name.rsplit("-", 1)[-1]
    steps = [
        row["_step"]
        for earlier in current.parent.glob(f"offline-run-*-{run_id}")
        if earlier != current
        for row in wandb_reader.history(earlier)
        if "_step" in row
    ]
    return max(steps, default=-1)


class WandbSink:
    """Rank 0's W&B run. Built by `start`, which returns None when W&B is disabled."""

    def __init__(self, cfg: Config, run: Any, floor: int, say: Callable[[str], None]) -> None:
        self.cfg, self.run, self.floor, self.say = cfg, run, floor, say

    @classmethod
    def start(cls, cfg: Config, start_step: int, say: Callable[[str], None]) -> WandbSink | None:
        """`start_step`: the step the run resumes from (0: a fresh run)."""
        wcfg = cfg.log.wandb
        mode = resolve_mode(wcfg.mode)
        if mode == "disabled":
            return None
        import wandb

        run_dir = Path(cfg.run_dir)
        id_path = run_dir / ID_FILE
        run_id = None
        if start_step > 0 and id_path.is_file():
            run_id = id_path.read_text().strip() or None
        resumed = run_id is not None
        run_id = run_id or new_run_id()
        wandb.setup(wandb.Settings(silent=True))  # our own one-line notes replace its chatter
        kwargs = {
            "project": wcfg.project,
            "entity": wcfg.entity,
            "name": cfg.run.name,
            "group": wcfg.group or cfg.run.name,
            "tags": list(wcfg.tags) or None,
            "notes": wcfg.notes or None,
            "config": config_lib.to_dict(cfg),
            "allow_val_change": True,  # a resumed job may change epochs, max_steps, ...
            "dir": str(run_dir),
            "id": run_id,
            "resume": "allow",
        }

        def init(mode: str) -> Any:
            settings = wandb.Settings(
                console="off",  # no stdout/stderr capture: the console stays ours
                silent=True,
                init_timeout=wcfg.init_timeout_s,
                save_code=False,
            )
            return wandb.init(mode=mode, settings=settings, **kwargs)

        reason = "log.wandb.mode=offline"
        if mode == "offline" and wcfg.mode == "auto":
            reason = "no credentials: set WANDB_API_KEY or run `wandb login`"
            if os.environ.get("WANDB_MODE"):
                reason = f"WANDB_MODE={os.environ['WANDB_MODE']}"
        if mode == "online":
            try:
                run = init("online")
            except Exception as e:  # no network, bad key, server down: never stop training
                wandb.teardown()  # the service still holds the id: a fresh one for offline
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                reason = f"server unreachable; {type(e).__name__}: {first[:160]}"
                mode = "offline"
        if mode == "offline":
            run = init("offline")
        fsio.write_text(id_path, run_id + "\n")
        floor = -1
        if resumed:
            # What W&B holds of the run: the server's steps (online) and the offline files of
            # earlier attempts. Not what metrics.jsonl holds: W&B's service drops the records
            # it had not yet written when the job is killed, and those steps are sent again.
            floor = max(run.starting_step - 1, _offline_last_step(Path(run.settings.sync_dir)))
        if mode == "online":
            say(f"W&B: {run.url}")
        else:
            sync_dir = Path(run.settings.sync_dir)
            pattern = sync_dir.parent / f"offline-run-*-{run_id}"
            say(f"W&B offline ({reason}): {sync_dir}  upload later: wandb sync {pattern}")
        return cls(cfg, run, floor, say)

    def log(self, record: dict[str, Any]) -> None:
        step = record["step"]
        if step <= self.floor:  # replayed after a resume: the earlier attempt sent it
            return
        data = {k: v for k, v in record.items() if k != "step" and _number(v)}
        self.run.log(data, step=step)

    def first_batch(self, grid: np.ndarray, x: torch.Tensor, model: nn.Module, step: int) -> None:
        import wandb

        if step > self.floor:
            self.run.log({"train_batch": wandb.Image(grid, caption="a training batch")}, step=step)

    def summary(self, values: dict[str, Any]) -> None:
        self.run.summary.update({k: v for k, v in values.items() if _number(v)})
        if self.cfg.log.wandb.log_checkpoints:
            self._log_model(values)

    def _log_model(self, values: dict[str, Any]) -> None:
        """The final model as an artifact: the export (`python -m distnn.checkpoint export`)
        of the latest checkpoint, `<run dir>/model.safetensors` (the weights) and `model.json`
        (what predict needs to rebuild it); `distnn.predict --checkpoint model.safetensors`
        reads it."""
        import wandb

        from distnn import checkpoint, safeload
        from distnn.errors import UserError

        run_dir = Path(self.cfg.run_dir)
        own = safeload.Trust("", own=run_dir)  # the run's own checkpoints, written just now
        try:
            step = checkpoint.load_file(run_dir, own)["position"]["step"]
            path = checkpoint.export(run_dir, run_dir / "model.safetensors", trust=own)
        except UserError as e:
            self.say(f"W&B: no model artifact: {e}")
            return
        name = re.sub(r"[^A-Za-z0-9_.-]", "-", f"model-{self.cfg.run.name}")
        metadata = {"step": step, "model": self.cfg.model.name}
        metadata |= {k: v for k, v in values.items() if k.startswith("val_") and _number(v)}
        artifact = wandb.Artifact(name, type="model", metadata=_finite(metadata))
        artifact.add_file(str(path), name=path.name)
        artifact.add_file(str(path.with_suffix(".json")), name=path.with_suffix(".json").name)
        self.run.log_artifact(artifact, aliases=["latest", f"step-{step}"])

    def close(self) -> None:
        import wandb

        self.run.finish()
        # finish() can return before wandb-core has written the last of the .wandb file;
        # ending the service (when no other run uses it) makes the file complete on return.
        if wandb.run is None:
            wandb.teardown()


def _finite(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if not (isinstance(v, float) and not math.isfinite(v))}
