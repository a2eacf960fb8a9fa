"""Logging for the app and the CLI: one format, and third-party notices that tell a user nothing dropped."""
from __future__ import annotations

import logging

# transformers 5 warns at import that CLIPImageProcessor / SiglipImageProcessor fall back to their PIL versions
# when torchvision is absent (diffusers' SDXL and Kontext pipelines import them for IP-adapter inputs Prism does
# not use): two lines on every start of the app on a machine without torchvision, with nothing to act on.
_NOISE = {"transformers.utils.import_utils": "requires torchvision (not installed)"}


class _DropNotice(logging.Filter):
    def __init__(self, fragment: str):
        super().__init__()
        self.fragment = fragment

    def filter(self, record: logging.LogRecord) -> bool:
        return self.fragment not in record.getMessage()


def drop_import_notices() -> None:
    """Drop the notices in _NOISE. First thing in a main(): parsing the arguments already imports diffusers."""
    for name, fragment in _NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNotice) and f.fragment == fragment for f in logger.filters):  # once per process
            logger.addFilter(_DropNotice(fragment))


def configure_logging(verbose: bool) -> None:
    """Prism's log lines: INFO with `verbose`, else WARNING."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
