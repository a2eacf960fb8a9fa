"""Logging for the app and the CLI: one format, and third-party notices that tell a user nothing dropped."""
from __future__ import annotations

import logging

# transformers 5 warns at import that CLIPImageProcessor / SiglipImageProcessor fall back to their PIL versions
# when torchvision is absent (diffusers' SDXL and Kontext pipelines import them for IP-adapter inputs Prism does
# not use): two lines on every start of the app on a machine without torchvision, with nothing to act on.
_NOTICE_LOGGER = "transformers.utils.import_utils"
_NOTICE = "requires torchvision (not installed)"


def _not_the_notice(record: logging.LogRecord) -> bool:
    return _NOTICE not in record.getMessage()


def drop_import_notices() -> None:
    """Drop the torchvision notice. First thing in a main(): parsing the arguments already imports diffusers.
    Calling it again changes nothing (a logger holds a given filter once)."""
    logging.getLogger(_NOTICE_LOGGER).addFilter(_not_the_notice)


def configure_logging(verbose: bool) -> None:
    """Prism's log lines: INFO with `verbose`, else WARNING.

    huggingface_hub prints its warnings with its own handler and also passes them up to the root logger, so each
    one (a download retry) showed twice, once plain and once in Prism's format; transformers and diffusers keep
    theirs to their own handler, and the Hub now does the same."""
    from huggingface_hub.utils import logging as hub_logging

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    hub_logging.disable_propagation()
