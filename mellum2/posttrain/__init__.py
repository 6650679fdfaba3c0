"""mellum2.posttrain: supervised fine-tuning examples (and later the SFT and RL stages).

`from mellum2.posttrain import sft_examples`: one conversation -> [(input_ids, labels)] for the
Instruct or Thinking variant (sft_examples.py; docs/chat.md).
"""
from .sft_examples import MODES, sft_examples
from .verify import score  # the RL reward: score(task, reply) -> (reward, reason); docs/sandbox.md

__all__ = ["sft_examples", "MODES"]
