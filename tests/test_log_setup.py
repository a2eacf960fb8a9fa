"""Start-up output: transformers' torchvision notice is dropped; every other warning still shows."""
from __future__ import annotations

import logging
import subprocess
import sys

from pipelines.log_setup import drop_import_notices


class Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_the_torchvision_notice_is_dropped_and_other_warnings_kept():
    drop_import_notices()
    drop_import_notices()  # every main() calls it; the filter goes on once
    assert len(logging.getLogger("transformers.utils.import_utils").filters) == 1
    noisy, ours, seen = logging.getLogger("transformers.utils.import_utils"), logging.getLogger("prism.app"), Collect()
    # transformers' loggers do not propagate to the root logger: listen on each directly.
    level = noisy.level  # conftest asks transformers for errors only
    noisy.setLevel(logging.WARNING)
    for logger in (noisy, ours):
        logger.addHandler(seen)
    try:
        noisy.warning("`CLIPImageProcessor` requires torchvision (not installed); falling back to `CLIPImageProcessorPil`")
        noisy.warning("Could not import module 'X'")
        ours.warning("requires torchvision (not installed)")  # only transformers' logger is filtered
    finally:
        for logger in (noisy, ours):
            logger.removeHandler(seen)
        noisy.setLevel(level)
    assert seen.messages == ["Could not import module 'X'", "requires torchvision (not installed)"]


def test_a_hub_warning_is_printed_once():
    """huggingface_hub's own handler and the root logger's both printed each retry warning."""
    code = ("from pipelines.log_setup import configure_logging; configure_logging(False); "
            "from huggingface_hub.utils import logging as l; l.get_logger('huggingface_hub.utils._http').warning('Retrying in 4s'); "
            "import logging; logging.getLogger('prism.app').warning('ours')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("Retrying in 4s") == 1, proc.stderr
    assert "WARNING prism.app: ours" in proc.stderr
