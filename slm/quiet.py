"""Keep the console readable: library progress bars and known-harmless warnings off.

Silenced warnings, each understood:
- Opacus' "Full backward hook is firing when gradients are computed with respect to
  module outputs since no inputs require gradients": the frozen base produces inputs
  without grad; per-sample gradients of the adapter are still computed (tests check
  them against manual per-example clipping).
- transformers' deprecation notices about gradient checkpointing, which we do not use.
- Ray's notice about overriding accelerator env vars on a CPU-only run.
Progress bars (tqdm: partitioners, GGUF dequantization) are off: our own per-round lines
are the progress display. Ray's coloured "(ClientAppActor pid=...)" prefixes lose their ANSI
codes when stdout is not a terminal (RAY_COLOR_PREFIX=0), so a redirected log is plain text. Flower's logger keeps its own console handler; it stops
propagating to the root logger, whose handler would print Flower's DEBUG records twice.
"""

import logging
import os
import sys
import warnings


def quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    if not sys.stdout.isatty():  # a redirected log is plain text: no ANSI colour codes from Ray or Flower
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
        try:
            from flwr.supercore.logger import update_console_handler

            update_console_handler(colored=False)
        except ImportError:
            pass
    logging.getLogger("flwr").propagate = False
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad=True to a scalar")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass
