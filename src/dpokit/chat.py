"""`dpokit chat`: talking to a model in the terminal, one conversation read line by line from stdin."""

from __future__ import annotations

import argparse
from typing import Any

from dpokit.data import Message
from dpokit.data.chat_template import TemplateRefused, apply_system_message, refusal_fix, refused_row, render_chat
from dpokit.devices import autocast_for
from dpokit.errors import UserError
from dpokit.generation import SamplingSettings, generate_responses, sampling_from_args
from dpokit.inference import load_with_settings, tokenizer_with_settings
from dpokit.settings import resolve

MERGE = "--system-message merge"


def run_chat(args: argparse.Namespace) -> int:
    """A conversation in the terminal; lines come from stdin, so it can be scripted."""
    view = resolve("chat", args, args.adapter)
    cfg = view.config
    settings = sampling_from_args(args)
    policy = cfg.system_message
    system = [{"role": "system", "content": args.system}] if args.system else []
    _check_system(tokenizer_with_settings(cfg, args.adapter), system, policy)
    model, tokenizer, _ = load_with_settings(cfg, args.adapter)
    view.announce("chat")
    device = next(model.parameters()).device
    history: list[Message] = list(system)
    print("type a message; /reset starts over, /exit leaves", flush=True)
    turn = 0
    while True:
        try:
            line = input("you> ")
        except EOFError:
            print()
            return 0
        text = line.strip()
        if text == "/exit":
            return 0
        if text == "/reset":
            history = list(system)
            print("(conversation cleared)", flush=True)
            continue
        if not text:
            continue
        history.append({"role": "user", "content": text})
        turn_settings = SamplingSettings(**{**settings.to_dict(), "seed": settings.seed + turn})
        try:
            with autocast_for(device, cfg.bf16):
                reply = generate_responses(model, tokenizer, [history], turn_settings, system_message=policy)[0][0]
        except TemplateRefused as e:  # this message is not sent; the conversation goes on without it
            history.pop()
            print(f"({e}; not sent)", flush=True)
            continue
        history.append({"role": "assistant", "content": reply})
        turn += 1
        print(f"assistant> {reply}", flush=True)


def _check_system(tokenizer: Any, system: list[Message], policy: str) -> None:
    """A `--system` message the chat template refuses stops at once, with the fix, before the model loads."""
    try:
        render_chat(tokenizer, apply_system_message([*system, {"role": "user", "content": "hi"}], policy))
    except TemplateRefused as e:
        fix = refusal_fix([refused_row("--system", e, {"messages": system})], MERGE)
        raise UserError(f"--system: {e}; {fix}") from None
