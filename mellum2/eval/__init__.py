"""Evaluations (`mellum2 eval <task>`, docs/eval.md): HumanEval and HumanEval infilling executed in the
sandbox, held-out repository line completion, bits per byte next to xz / zstd, MTP acceptance, the
post-training suites, passkey and perplexity by position (docs/long_context.md), the lm-evaluation-harness
model class; and `mellum2 speedrun` with its report card. One module per evaluation."""
