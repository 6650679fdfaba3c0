"""mellum2.posttrain: supervised fine-tuning examples (and later the SFT and RL stages).

`from mellum2.posttrain import sft_examples`: one conversation -> [(input_ids, labels)] for the
Instruct or Thinking variant (sft_examples.py; docs/chat.md).

The embedded post-training data (docs/posttrain.md): `sft_conversations` (SFT conversations, train /
held-out), `sft_eval_prompts` + `check_reply` (held-out prompts with what a reply must contain),
`rl_tasks` (RL prompts with verifiable answers), `read_conversations` / `load_conversations` (SFT data
files: OpenAI, ShareGPT, Hugging Face datasets); `score(task, reply)`, the verifiable reward
(verify.py; docs/sandbox.md); `grpo_loss` and `loo_advantages`, the RL objective (grpo.py; the
trainer `mellum2 rl` is rl.py, docs/rl.md).
"""
from .grpo import grpo_loss, loo_advantages  # Mellum 2's GRPO variant (grpo.py; docs/rl.md)
from .formats import DataFormatError, ReadStats, load_conversations, read_conversations
from .rltasks import rl_tasks
from .sft_examples import MODES, sft_examples
from .sftdata import sft_conversations
from .sfteval import check_reply, sft_eval_prompts
from .verify import score  # the RL reward: score(task, reply) -> (reward, reason); docs/sandbox.md

__all__ = ["sft_examples", "MODES", "sft_conversations", "sft_eval_prompts", "check_reply", "rl_tasks",
           "read_conversations", "load_conversations", "ReadStats", "DataFormatError", "score",
           "grpo_loss", "loo_advantages"]
