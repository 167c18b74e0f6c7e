"""Answer a prompt with the base language model plus a trained adapter, streaming the reply as it is generated.

The prompt goes through the tokenizer's chat template as a user message (the format the chat task trains
on). The adapter (wire format, e.g. a run's global.safetensors) is merged into the base weights; without
--adapter the base model answers alone, for comparison. Greedy decoding by default; --temperature > 0 samples.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from edge_client.model_check import check_adapter_base
from hetlora.models.bundled import default_model_dir
from hetlora.models.folders import check_model_dir
from hetlora.errors import UserError
from hetlora.protocol.wire import decode


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", required=True, help="the user's message ('-' reads it from standard input)")
    p.add_argument("--adapter", help="adapter in the wire format (.safetensors); default: the base model alone")
    p.add_argument("--model", help="base model folder (default: the installed SmolLM2-135M-Instruct)")
    p.add_argument("--system", help="a system message (default: the chat template's own)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="longest reply in tokens (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass when sampling (default 0.9)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", action="store_true", help="print {prompt, reply, tokens, seconds} as JSON, no streaming")


def run(args: argparse.Namespace) -> int:
    # torch and transformers load when the command runs: its --help and argument errors stay instant
    from edge_client.evaluate import Evaluator
    import torch
    from transformers import TextStreamer

    if args.max_new_tokens < 1 or args.temperature < 0 or not 0 < args.top_p <= 1:
        raise UserError("--max-new-tokens must be >= 1, --temperature >= 0 and --top-p in (0, 1]")
    if args.threads:
        torch.set_num_threads(args.threads)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not prompt.strip():
        raise UserError("the prompt is empty")
    model_dir = check_model_dir(args.model) if args.model else default_model_dir("causal-lm")
    model = Evaluator(model_dir, "causal-lm")
    if args.adapter:
        path = Path(args.adapter)
        if not path.is_file():
            raise UserError(f"adapter file {path} does not exist")
        adapter = decode(path.read_bytes())
        check_adapter_base(adapter, model_dir, "causal-lm")
        model.merge(adapter)
    tokenizer = model.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(f"the tokenizer of {model_dir} has no chat template; generate needs a chat model")
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": prompt}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    torch.manual_seed(args.seed)
    streamer = None if args.json else TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    sampling = {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p} if args.temperature > 0 \
        else {"do_sample": False}
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.model.generate(**inputs, max_new_tokens=args.max_new_tokens, streamer=streamer,
                                   eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                   **sampling)
    reply_ids = out[0, inputs["input_ids"].shape[1]:]
    if args.json:
        print(json.dumps({"prompt": prompt, "reply": tokenizer.decode(reply_ids, skip_special_tokens=True).strip(),
                          "tokens": int(reply_ids.numel()), "seconds": round(time.perf_counter() - t0, 3)}, indent=2))
    return 0
