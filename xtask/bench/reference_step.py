#!/usr/bin/env python3
"""The reference side of `cargo xtask bench --reference`: one QLoRA training step in
transformers + PEFT + bitsandbytes on the CPU, timed the same way as `qlora bench-step`.

    python xtask/bench/reference_step.py prepare --gguf PATH --out DIR
        SmolLM2-135M-Instruct from its GGUF (transformers' own GGUF loader, float32) saved as an HF
        checkpoint in DIR: the same weights our side loads from the same file.
    python xtask/bench/reference_step.py step --model DIR --batch 4 --seq 256 --dtype f32|bf16
                                              [--steps 5] [--warmup 1] [--threads 2]
        Loads DIR with BitsAndBytesConfig(nf4, double quant, compute dtype), QLoRA's preparation
        (prepare_model_for_kbit_training with gradient checkpointing, non-reentrant), LoRA r 64, alpha 16,
        dropout 0.05 on all linear layers, torch AdamW (lr 2e-4, betas 0.9/0.999, no weight decay), and
        times forward + backward + clip (max norm 0.3) + optimizer step on random token ids (loss on every
        token). bf16 follows QLoRA's qlora.py with --bf16: model loaded in bf16, LoRA layers, embeddings
        and lm_head in bf16, norms in f32, the step under torch.autocast(bfloat16).
        Prints one JSON line: median/min/max step seconds, tokens/s, peak RSS of the steps (VmHWM reset
        after loading) and of the whole process, thread count, versions.

Pinned versions: xtask/fixtures/requirements.txt (the venv `cargo xtask bench --reference` makes).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time


def vm_hwm_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return 0.0


def reset_hwm() -> None:
    # Linux: writing 5 to clear_refs resets the peak resident set size to the current one.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def prepare(args: argparse.Namespace) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = os.path.abspath(args.gguf)
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf), dtype=torch.float32)
    # A model loaded from GGUF refuses save_pretrained (it counts as quantized): write the dequantized f32
    # weights and the config ourselves.
    from safetensors.torch import save_model

    os.makedirs(args.out, exist_ok=True)
    save_model(model, os.path.join(args.out, "model.safetensors"), metadata={"format": "pt"})
    config = model.config
    for key in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, key):
            delattr(config, key)
    config.save_pretrained(args.out)
    AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf)).save_pretrained(args.out)
    print(f"saved {args.out}", file=sys.stderr)


def step(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    import bitsandbytes
    import peft
    import transformers
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    bf16 = args.dtype == "bf16"
    compute = torch.bfloat16 if bf16 else torch.float32
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute,
    )
    model = AutoModelForCausalLM.from_pretrained(args.model, quantization_config=quant, dtype=compute, device_map={"": "cpu"})
    model.config.use_cache = False
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.05, target_modules="all-linear", bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    if bf16:  # qlora.py's dtype fix-ups for --bf16
        for name, module in model.named_modules():
            if isinstance(module, LoraLayer):
                module.to(torch.bfloat16)
            if "norm" in name:
                module.to(torch.float32)
            if ("lm_head" in name or "embed_tokens" in name) and hasattr(module, "weight") and module.weight.dtype == torch.float32:
                module.to(torch.bfloat16)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(params, lr=2e-4, betas=(0.9, 0.999), weight_decay=0.0)
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(1234)

    losses = []

    def one_step() -> float:
        ids = torch.randint(0, vocab, (args.batch, args.seq), generator=generator)
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.3)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        return time.perf_counter() - started

    process_peak_load = vm_hwm_mib()
    reset_hwm()
    for _ in range(args.warmup):
        one_step()
    times = [one_step() for _ in range(args.steps)]
    median = statistics.median(times)
    print(json.dumps({
        "side": "reference",
        "batch": args.batch,
        "seq": args.seq,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "steps": args.steps,
        "median_s": median,
        "min_s": min(times),
        "max_s": max(times),
        "tokens_per_s": args.batch * args.seq / median,
        "step_peak_rss_mib": vm_hwm_mib(),
        "process_peak_rss_mib": max(process_peak_load, vm_hwm_mib()),
        "trainable_params": trainable,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "model_path": os.path.abspath(args.model),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "bitsandbytes": bitsandbytes.__version__,
        },
    }), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--gguf", required=True)
    p.add_argument("--out", required=True)
    s = sub.add_parser("step")
    s.add_argument("--model", required=True)
    s.add_argument("--batch", type=int, default=4)
    s.add_argument("--seq", type=int, default=256)
    s.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
    s.add_argument("--steps", type=int, default=5)
    s.add_argument("--warmup", type=int, default=1)
    s.add_argument("--threads", type=int, default=2)
    s.add_argument("--lora-r", type=int, default=64)
    s.add_argument("--lora-alpha", type=float, default=16.0)
    args = parser.parse_args()
    prepare(args) if args.command == "prepare" else step(args)


if __name__ == "__main__":
    main()
