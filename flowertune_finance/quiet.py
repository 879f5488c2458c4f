"""Known, harmless library messages, filtered at their source so a run's log shows what matters.

Each filter names one message and why it carries no information for this app. Imported
first by both apps (a deliberate process-wide setting); everything else still reaches the log.
"""

from __future__ import annotations

import logging
import warnings


class _DropMessage(logging.Filter):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def quiet_known_messages() -> None:
    # bitsandbytes on a CPU with AVX512-BF16 looks for an optional fused 4-bit kernel in the `kernels`
    # package; without it the built-in kernel runs (peft imports bitsandbytes even at quantization 0).
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropMessage("kernels-community"))
    # transformers 5 renamed gradient checkpointing to activation checkpointing; the template's
    # `train.training-arguments.gradient-checkpointing` key keeps the old name, which still works.
    warnings.filterwarnings("ignore", message=r".*gradient_checkpointing.*deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r"`gradient_checkpointing` is deprecated", category=FutureWarning)
    # A library imported by transformers' trainer stack defines TorchScript methods at import time.
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.script_method` is deprecated", category=DeprecationWarning)


quiet_known_messages()
