"""The checkpoints of a run directory: kept, restored, repaired after a crash.

A process killed while TensorFlow writes a checkpoint leaves `ckpt-N_temp/` behind, and may
leave `ckpt-N` truncated while the state file already names it. On resume the temporary
folders are removed and the newest checkpoint that restores is used; broken ones are deleted
with a warning, so a crash costs at most the steps since the previous checkpoint.

In a multi-worker run every worker saves (TensorFlow's rule: saving is collective), the chief
into the run directory and the others into a private folder they remove after each save;
every worker restores the checkpoint the chief chose, from the run directory.
"""
import glob
import logging
import os
import shutil

import tensorflow as tf

from fqat_tf import defaults, runtime
from fqat_tf.rundir import RunError

log = logging.getLogger(__name__)


def _manager(checkpoint, directory):
    return tf.train.CheckpointManager(checkpoint, directory,
                                      max_to_keep=defaults.CHECKPOINTS_KEPT)


def remove_stale_temporaries(directory):
    """Removes what an interrupted checkpoint write left (`*_temp` folders); returns them."""
    stale = sorted(glob.glob(os.path.join(glob.escape(directory), "*_temp*")))
    for path in stale:
        if os.path.isdir(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)
    return stale


def _delete(prefix):
    for path in glob.glob(glob.escape(prefix) + ".*"):
        os.unlink(path)


def restore_latest(checkpoint, directory):
    """Restores the newest intact checkpoint in `directory`.

    Broken checkpoints (truncated or missing files) are deleted with a warning and the state
    file is rewritten without them, so later saves rotate intact checkpoints only.

    Returns:
        `(manager, step)`: a CheckpointManager keeping the last `defaults.CHECKPOINTS_KEPT`
        checkpoints, and the restored checkpoint's number, or None if there is none.

    Raises:
        RunError: checkpoints exist but none of them restores.
    """
    for path in remove_stale_temporaries(directory):
        log.warning("removed %s, left by an interrupted checkpoint write", path)
    ckpt_manager = _manager(checkpoint, directory)
    candidates = list(reversed(ckpt_manager.checkpoints))
    broken = []
    for path in candidates:
        try:
            checkpoint.restore(path).assert_existing_objects_matched()
        # A damaged file fails in many ways (OpError, IndexError, ValueError, ...); any
        # failure to restore makes the checkpoint unusable, and the next one is tried.
        except Exception as e:  # noqa: BLE001
            broken.append(path)
            log.warning("checkpoint %s cannot be restored (%s: %s); falling back to the "
                        "previous one", path, type(e).__name__, str(e).splitlines()[0][:200])
            continue
        if broken:
            for bad in broken:
                _delete(bad)
            kept = [p for p in ckpt_manager.checkpoints if p not in broken]
            tf.compat.v1.train.update_checkpoint_state(
                directory, path, all_model_checkpoint_paths=kept)
            ckpt_manager = _manager(checkpoint, directory)
        return ckpt_manager, int(path.rsplit("-", 1)[1])
    if candidates:
        raise RunError(f"{directory}: no checkpoint restores ({', '.join(candidates)}); "
                       f"delete the run directory to start it again")
    return ckpt_manager, None


class RunCheckpoints:
    """The checkpoints of one stage, for the chief and the other workers alike.

    Args:
        checkpoint: the stage's `tf.train.Checkpoint`.
        directory: the run directory's checkpoint folder.
        strategy: the distribution strategy the stage trains under.
    """

    def __init__(self, checkpoint, directory, strategy):
        self.checkpoint, self.directory, self.strategy = checkpoint, directory, strategy
        self.chief = runtime.is_chief(strategy)
        self.manager = None
        self._private = None if self.chief else os.path.join(
            directory, f".worker-{runtime.worker_index(strategy)}")

    def restore(self):
        """Restores the newest intact checkpoint the chief finds; returns its step or None."""
        step = None
        if self.chief:
            self.manager, step = restore_latest(self.checkpoint, self.directory)
        step = runtime.chief_decides(self.strategy, -1 if step is None else step)
        if not self.chief:
            self.manager = _manager(self.checkpoint, self._private)
            if step >= 0:
                self.checkpoint.restore(os.path.join(self.directory, f"ckpt-{step}")
                                        ).assert_existing_objects_matched()
        return None if step < 0 else step

    @property
    def latest(self):
        """The chief's newest checkpoint, or None."""
        return tf.train.latest_checkpoint(self.directory)

    def save(self, step):
        """Saves checkpoint `step` (every worker must call it)."""
        self.manager.save(checkpoint_number=step)
        if self._private is not None:
            shutil.rmtree(self._private, ignore_errors=True)
