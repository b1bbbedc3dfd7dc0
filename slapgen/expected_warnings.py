"""Library warnings that are expected on this stack and say nothing to a user, filtered by their exact
message so that every other warning of the same libraries stays visible.

On a machine without CUDA, importing torchao (diffusers and slapgen's quantisation import it) logs that
its CUDA kernel libraries (`torchao/_C*.so`) cannot load and that Triton is missing: true, and harmless
there (slapgen uses torchao's CPU paths or none). On every machine, torchao registers two enums that
torch 2.13 now supports natively (torch warns that this is deprecated), and diffusers says it cannot
import torchao tensor classes that torchao 0.18 no longer has (it needs them only to unpickle old
torchao checkpoints, which slapgen never loads). On a CUDA machine a torchao kernel that fails to load
or a missing Triton is a real problem, so those two stay visible there. And a prompt longer than the text
encoder reads: CogVideoX's pipelines tokenize it once uncut to find what they cut, so transformers warns that
running it "will result in indexing errors", which never happen; the pipeline cuts the prompt and logs the
cut words itself (diffusers' "The following part of your input was truncated ..."), which stays.
"""

from __future__ import annotations

import logging
import re

# (logger name, message pattern, only where CUDA is unavailable)
EXPECTED: list[tuple[str, re.Pattern, bool]] = [
    ("torchao", re.compile(r"^Failed to load \S*torchao[/\\]_C\w*\.\S*\.so: "), True),
    ("torchao.kernel.intmm", re.compile(r"Detected no triton, on systems without Triton"), True),
    ("torch.utils._pytree", re.compile(r"^<enum '\w+'> is an Enum subclass and is now natively supported"), False),
    ("diffusers.quantizers.torchao.torchao_quantizer",
     re.compile(r"^Unable to import `torchao` Tensor objects"), False),
    ("transformers.tokenization_utils_base",
     re.compile(r"^Token indices sequence length is longer than the specified maximum sequence length for this model "
                r"\(\d+ > \d+\)\. Running this sequence through the model will result in indexing errors$"), False),
]


class _DropExpected(logging.Filter):
    def __init__(self, pattern: re.Pattern):
        super().__init__()
        self.pattern = pattern

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def silence_expected_warnings() -> None:
    """Install the filters (once per process). Call it before torchao or diffusers is imported: a
    logger's filter sees only what is logged after it is added."""
    import torch

    without_cuda = not torch.cuda.is_available()
    for name, pattern, cpu_only in EXPECTED:
        logger = logging.getLogger(name)
        if (without_cuda or not cpu_only) and not any(
                isinstance(f, _DropExpected) and f.pattern is pattern for f in logger.filters):
            logger.addFilter(_DropExpected(pattern))
