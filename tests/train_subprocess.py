"""`python tests/train_subprocess.py <jaxft command> ...`: the jaxft CLI in a child process,
for tests that signal or kill a run.

With JAXFT_TEST_HANG_SAVE_AT=K in the environment, the checkpoint of step K hangs after all
its data is written but before Orbax commits it (renames its temporary folder), after
printing "HANG_SAVE <temporary folder>": a test can then kill -9 the process mid-save.
"""

import logging
import os
import sys
import threading
from pathlib import Path


def hang_save_at(step: int) -> None:
    from orbax.checkpoint import CompositeCheckpointHandler

    original = CompositeCheckpointHandler.finalize

    def finalize(self, directory):
        # Runs on Orbax's background commit thread, on "<step>.orbax-checkpoint-tmp".
        if Path(directory).name.split(".")[0] == str(step):
            print(f"HANG_SAVE {directory}", flush=True)
            threading.Event().wait()
        return original(self, directory)

    CompositeCheckpointHandler.finalize = finalize


if __name__ == "__main__":
    # As jaxft.cli does, but before Orbax (absl) is imported: its root handler would make the
    # CLI's basicConfig a no-op and hide the INFO lines the tests read.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if os.environ.get("JAXFT_TEST_HANG_SAVE_AT"):
        hang_save_at(int(os.environ["JAXFT_TEST_HANG_SAVE_AT"]))
    from jaxft.cli import main

    main(sys.argv[1:])
