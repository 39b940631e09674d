"""A user model whose first trial kills its own worker process, as the kernel's OOM killer or a lost node would.

Only inside a Ray worker and only once: the marker file next to this module is
created (atomically, before the kill) by the first trial that builds the model,
so the retried trial, the driver's baseline and every later trial build it normally.
"""

import os
import signal
from pathlib import Path

from netshrink.tasks.models import lenet5

MARKER = Path(__file__).with_name("killed-a-worker")


def make(num_classes, input_shape):
    if _in_ray_worker() and _first_time():
        os.kill(os.getpid(), signal.SIGKILL)
    return lenet5(num_classes, in_channels=input_shape[0], image_size=input_shape[-1])


def _in_ray_worker() -> bool:
    import ray

    return ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None  # Tune runs trials in actors


def _first_time() -> bool:
    try:
        os.close(os.open(MARKER, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True
