"""Publish new weights from a trainer's memory to a hotswap InferencePool (`pip install "hotswap[trainer]"`).

See `publisher.Publisher`. Torch and the Mooncake transfer engine, no vLLM: the bytes stay in the
trainer's pinned host memory and the pool's agents read them with one-sided Mooncake reads.
"""

from hotswap_trainer.memory import PublishError, TrainerMemory
from hotswap_trainer.publisher import Publisher, PublishFailed, PublishHandle

__all__ = ["PublishError", "PublishFailed", "PublishHandle", "Publisher", "TrainerMemory"]
