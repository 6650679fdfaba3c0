"""`mellum2 chat --model DIR`: talk to an Instruct or Thinking checkpoint in the terminal.

    mellum2 chat --model runs/sft [--system "You are ..."] [--no-think] [--tools tools.json]

Each turn renders the whole conversation with the chat template (template.py), generates with the
inference engine (`Engine.stream`, MTP self-speculative when the checkpoint has an MTP head) and
streams the answer through the incremental parser (stream.py): reasoning is shown apart, under
`[thinking]` (dimmed on a terminal), the answer under `[answer]`, tool calls as `[tool call]` lines
whose arguments stream as they come. Sampling defaults are Mellum 2's recommended ones (temperature
0.6, top_p 0.95, top_k 20). The tokenizer is read from the model directory (or its run).

Commands: /reset (forget the conversation), /system [TEXT] (set or clear the system prompt),
/think and /no-think (reasoning on or off from the next turn), /tool TEXT (answer the pending tool
call; once every call has its answer the model goes on), /help, /quit. Ctrl-C stops a reply.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from mellum2.errors import MellumError, UsageError

from .stream import StreamParser
from .template import CONTROL, opens_think, render, validate

HELP = ("commands: /reset  /system [TEXT]  /think  /no-think  /tool TEXT  /help  /quit   "
        "(anything else is your message)")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class Chat:
    """One conversation with a model: the history, the system prompt, the thinking switch.

    `say(text)` adds a user message and streams the reply to `out`; `command(line)` runs a /command.
    The history holds parsed assistant messages (content, reasoning_content, tool_calls), so the
    template re-renders them exactly as any OpenAI-style client would send them back."""

    def __init__(self, engine, tokenizer, params, context: int, system: str | None = None, think: bool = True,
                 tools=None, speculative: bool = False, draft_tokens: int = 1, out=None, err=None,
                 color: bool | None = None):
        self.engine, self.tok, self.params, self.context = engine, tokenizer, params, context
        self.system, self.think, self.tools = system, think, tools
        self.speculative, self.draft_tokens = speculative, draft_tokens
        self.out, self.err = out or sys.stdout, err or sys.stderr
        self.color = self.out.isatty() if color is None else color
        self.history: list[dict] = []
        self.pending: list[dict] = []  # tool calls of the last reply still without an answer
        self.last_prompt_ids: list[int] = []
        # a turn ends at <|im_end|>; <|endoftext|> or a new <|im_start|> end it too
        self.stop_ids = tuple(sorted({tokenizer.eos_id, tokenizer.eot_id, tokenizer.im_start_id}))

    @property
    def messages(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.history

    # ------------------------------------------------------------------ commands
    def command(self, line: str) -> bool:
        """Run one /command; False means quit."""
        cmd, _, arg = line.strip().partition(" ")
        if cmd in ("/quit", "/exit"):
            return False
        if cmd == "/reset":
            self.history, self.pending = [], []
            self._note("conversation cleared")
        elif cmd == "/system":
            validate([{"role": "system", "content": arg.strip()}])
            self.system = arg.strip() or None
            self._note(f"system prompt {'set' if self.system else 'cleared'}")
        elif cmd in ("/think", "/no-think"):
            self.think = cmd == "/think"
            self._note(f"thinking {'on' if self.think else 'off'}")
        elif cmd == "/tool":
            if not self.pending:
                self._note("no tool call is waiting for an answer")
            else:
                call = self.pending.pop(0)
                self.history.append({"role": "tool", "tool_call_id": call["id"], "content": arg})
                if not self.pending:
                    self.reply()
        else:
            self._note(HELP)
        return True

    def say(self, text: str) -> dict | None:
        validate([{"role": "user", "content": text}])
        self.history.append({"role": "user", "content": text})
        self.pending = []
        return self.reply()

    # ------------------------------------------------------------------ one reply
    def reply(self) -> dict | None:
        """Generate the next assistant turn, streaming it; returns the parsed message (None if stopped)."""
        prompt = render(self.messages, self.tools, add_generation_prompt=True, enable_thinking=self.think)
        ids = self.last_prompt_ids = self.tok.encode(prompt)
        room = self.context - len(ids)
        if room < 1:
            self._note(f"the conversation ({len(ids)} tokens) fills the model's context of {self.context}: "
                       f"/reset to start over")
            self.history.pop()  # the message that did not fit
            return None
        params = self.params.replace(max_new_tokens=min(self.params.max_new_tokens, room),
                                     stop_token_ids=tuple(self.params.stop_token_ids) + self.stop_ids)
        parser = StreamParser(think_open=opens_think(prompt))
        view = _View(self.out, self.color)
        t0 = time.perf_counter()
        gen = self.engine.stream([ids], params, speculative=self.speculative, draft_tokens=self.draft_tokens,
                                 detokenize=self.tok.decode)
        new: list[int] = []
        shown = 0
        V = self.tok.vocab_size  # ids past the tokenizer (a model vocabulary padded beyond it) show as nothing
        try:
            for d in gen:
                new += [t for t in d.tokens if t < V]
                text = self.tok.decode(new)
                if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its next byte
                    continue
                for delta in parser.feed(text[shown:]):
                    view.show(delta)
                shown = len(text)
        except KeyboardInterrupt:
            view.end()
            self._note("stopped; the reply is not kept")
            return None
        text = self.tok.decode(new)
        for delta in parser.feed(text[shown:]) + parser.close():
            view.show(delta)
        view.end()
        msg = parser.message
        for e in msg["errors"]:
            self._note(f"malformed {e} (kept as text)")
        r, s = gen.results[0], gen.stats
        if r.finish_reason == "length":
            self._note(f"stopped after {len(r.tokens)} tokens (--max-new-tokens or the context)")
        line = f"[{s.new_tokens} tokens, {s.tokens_per_s:.1f} tok/s"
        if s.speculative:
            line += f", MTP acceptance {s.acceptance:.2f}"
        print(line + f", {time.perf_counter() - t0:.1f} s]", file=self.err, flush=True)
        self.history.append(_for_history(msg))
        self.pending = list(msg["tool_calls"])
        if self.pending:
            self._note(f"answer {'each call' if len(self.pending) > 1 else 'the call'} with /tool RESULT")
        return msg

    def _note(self, text: str) -> None:
        self.out.write(f"({text})\n")
        self.out.flush()


def _for_history(msg: dict) -> dict:
    """The parsed reply as a message the template can render again (control tokens stripped)."""
    def clean(s):
        for t in CONTROL:
            s = s.replace(t, "")
        return s
    out = {"role": "assistant", "content": clean(msg["content"])}
    if msg["reasoning_content"]:
        out["reasoning_content"] = clean(msg["reasoning_content"])
    if msg["tool_calls"]:
        out["tool_calls"] = msg["tool_calls"]
    return out


class _View:
    """Writes deltas as sections: [thinking] (dimmed on a terminal), [answer], [tool call] lines."""

    DIM, RESET = "\x1b[2m", "\x1b[0m"

    def __init__(self, out, color: bool):
        self.out, self.color = out, color
        self.section = None
        self.thought = False  # a [thinking] section was shown this turn
        self.at_line_start = True

    def _open(self, section: str, label: str | None) -> None:
        if self.section == section:
            return
        self._close()
        if label:
            self._write(label + "\n")
        if section == "thinking" and self.color:
            self.out.write(self.DIM)
        self.section = section

    def _close(self) -> None:
        if self.section == "thinking" and self.color:
            self.out.write(self.RESET)
        if not self.at_line_start:
            self._write("\n")

    def _write(self, s: str) -> None:
        if s:
            self.out.write(s)
            self.at_line_start = s.endswith("\n")

    def show(self, delta: dict) -> None:
        if "reasoning_content" in delta:
            self._open("thinking", "[thinking]")
            self.thought = True
            self._write(delta["reasoning_content"])
        elif "content" in delta:
            self._open("answer", "[answer]" if self.thought else None)
            self._write(delta["content"])
        elif "tool_calls" in delta:
            tc = delta["tool_calls"][0]
            fn = tc.get("function", {})
            self._open(f"call {tc['index']}", None)
            if "name" in fn:
                self._write(f"[tool call] {fn['name']} ")
            self._write(fn.get("arguments", ""))
        self.out.flush()

    def end(self) -> None:
        self._close()
        self.section = None
        self.out.flush()


# ---------------------------------------------------------------------- the command line
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mellum2 chat", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description="chat with an Instruct or Thinking checkpoint in the terminal")
    a = p.add_argument
    a("--model", required=True, help="checkpoint directory or training run directory")
    a("--tokenizer", default=None, help="tokenizer directory (default: found next to the model)")
    a("--system", default=None, help="system prompt")
    a("--think", action=argparse.BooleanOptionalAction, default=True,
      help="let the model reason before answering (--no-think: an empty think span opens each reply)")
    a("--tools", default=None, metavar="FILE", help="JSON file with a list of OpenAI-style tool schemas")
    a("--temperature", type=float, default=0.6, help="sampling temperature (0 = greedy); Mellum 2's recommended value")
    a("--top-p", type=float, default=0.95, help="nucleus sampling")
    a("--top-k", type=int, default=20, help="sample among the k likeliest tokens")
    a("--max-new-tokens", type=int, default=2048, help="per reply (also capped by the model's context)")
    a("--seed", type=int, default=None, help="sampling seed (reproducible replies)")
    a("--speculative", action=argparse.BooleanOptionalAction, default=None,
      help="MTP self-speculative decoding (default: on when the checkpoint has an MTP head)")
    a("--draft-tokens", type=int, default=1, help="drafts per step with MTP speculation (the head reused)")
    a("--dtype", choices=sorted(DTYPES), default="fp32")
    a("--threads", type=int, default=None, help="torch threads (default: torch's)")
    return p


def _load_tools(path: str | None):
    if path is None:
        return None
    try:
        tools = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise UsageError(f"--tools {path}: cannot read ({e.strerror or e})") from None
    except json.JSONDecodeError as e:
        raise UsageError(f"--tools {path}: not valid JSON ({e.msg}, line {e.lineno})") from None
    validate([{"role": "user", "content": ""}], tools)
    return tools


def open_chat(args, out=None, err=None) -> Chat:
    """A Chat over the model, tokenizer and sampling options of parsed `args`."""
    from mellum2.infer import Engine, SamplingParams
    from mellum2.infer.cli import CliError, load_draft_vocab, resolve_tokenizer
    from mellum2.model import load_pretrained, resolve_model_dir

    if args.threads:
        torch.set_num_threads(args.threads)
    tools = _load_tools(args.tools)
    try:
        mdir = resolve_model_dir(args.model)
        tok = resolve_tokenizer(args.tokenizer, mdir)
    except (FileNotFoundError, CliError, ValueError) as e:
        raise UsageError(f"--model {args.model}: {e}") from None
    try:
        params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                                top_k=args.top_k, seed=args.seed)
    except ValueError as e:
        raise UsageError(str(e).replace("SamplingParams.", "--").replace("_", "-")) from None
    model = load_pretrained(mdir, dtype=DTYPES[args.dtype])
    if model.cfg.vocab_size < tok.vocab_size:
        raise UsageError(f"--model {mdir}: vocab_size {model.cfg.vocab_size} is smaller than its tokenizer's "
                         f"{tok.vocab_size} ({tok.source})")
    spec = model.mtp is not None if args.speculative is None else args.speculative
    engine = Engine(model, draft_vocab=load_draft_vocab(mdir) if model.mtp is not None else None)
    return Chat(engine, tok, params, model.cfg.max_position_embeddings, system=args.system, think=args.think, tools=tools, speculative=spec,
                draft_tokens=args.draft_tokens, out=out, err=err)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    chat = open_chat(args)
    out = chat.out
    mode = "on" if chat.think else "off"
    out.write(f"mellum2 chat: {args.model} (thinking {mode}, "
              f"{'MTP speculative' if chat.speculative else 'plain'} decoding). {HELP}\n")
    while True:
        try:
            line = input("> ")
        except EOFError:
            out.write("\n")
            return 0
        except KeyboardInterrupt:
            out.write("\n")
            return 0
        if not line.strip():
            continue
        try:
            if line.startswith("/"):
                if not chat.command(line):
                    return 0
            else:
                chat.say(line)
        except MellumError as e:  # a bad /system text, ...: say so and go on
            chat._note(f"error: {e}")


if __name__ == "__main__":
    sys.exit(main())
