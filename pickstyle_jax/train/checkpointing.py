"""What a training run keeps on disk, and how it stops and resumes (loop.py): the Orbax checkpoint manager over the
train state, the step key and the Grain iterator; SIGTERM/SIGINT as a flag the loop reads between steps; on resume,
the metrics a killed run logged past its checkpoint dropped; at the end, the LoRA exported.
"""
from __future__ import annotations

import json
import signal
from pathlib import Path

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from pickstyle_jax import checkpoints, files, lora as lora_lib, lora_export

__all__ = ["Signals", "checkpoint_manager", "save", "restore_state", "trim_metrics", "export_lora"]


class Signals:
    """SIGTERM/SIGINT set a flag the loop reads between steps (save, then exit)."""

    def __init__(self):
        self.signum = 0
        self._old = {}

    def __enter__(self):
        for s in (signal.SIGTERM, signal.SIGINT):
            self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signum = signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)

    def agreed(self) -> int:
        """The signal any process got (all processes must stop at the same step)."""
        if jax.process_count() == 1:
            return self.signum
        return int(np.max(multihost_utils.process_allgather(np.int32(self.signum))))


def checkpoint_manager(workdir, keep) -> ocp.CheckpointManager:
    """WORKDIR/checkpoints, the last `keep` steps, synchronous saves (a save returns when it is on disk)."""
    return ocp.CheckpointManager(
        Path(workdir).absolute() / "checkpoints",
        options=ocp.CheckpointManagerOptions(max_to_keep=int(keep), create=True, enable_async_checkpointing=False),
        item_handlers={"state": ocp.StandardCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler()})


def save(mgr, step, state, key_data, it) -> None:
    """Checkpoint `step`: {"train": state, "key": key data} and the data iterator's position (collective)."""
    mgr.save(int(step), args=ocp.args.Composite(
        state=ocp.args.StandardSave({"train": state, "key": key_data}),
        data=grain.checkpoint.CheckpointSave(it)), force=True)
    mgr.wait_until_finished()


def restore_state(mgr, step, abstract, it=None):
    """{"train": state, "key": key data} of a checkpoint step, placed as `abstract` says; the data iterator too
    when given."""
    items = {"state": ocp.args.StandardRestore(abstract)}
    if it is not None:
        items["data"] = grain.checkpoint.CheckpointRestore(it)
    return mgr.restore(int(step), args=ocp.args.Composite(**items))["state"]


def trim_metrics(path: Path, last_step: int) -> None:
    """A resumed run re-logs the steps after its checkpoint: drop what a killed run logged beyond it."""
    if path.is_file():
        lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
        files.write_text(path, "".join(ln + "\n" for ln in lines if json.loads(ln)["step"] <= last_step))


def export_lora(workdir, adapters: lora_lib.Lora) -> Path:
    """DIR/lora (our checkpoint), DIR/pickstyle_lora.pth (PickStyle's layout) and DIR/lora.safetensors (PEFT/diffusers
    layout with alpha/rank metadata, as `convert.lora --export` writes), the last two without torch (lora_export)."""
    workdir = Path(workdir)
    adapters = lora_lib.Lora(jax.tree.map(lambda x: np.asarray(x, np.float32), adapters.params), adapters.config)
    checkpoints.save_lora(workdir / "lora", adapters)  # collective: every process calls export_lora
    if jax.process_index() == 0:
        lora_export.write_pickstyle_pth(workdir / "pickstyle_lora.pth", adapters)
        lora_export.write_peft_safetensors(workdir / "lora.safetensors", adapters)
    return workdir / "lora"
