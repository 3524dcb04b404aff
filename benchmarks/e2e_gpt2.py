"""End-to-end GPT-2 benchmark: a small GPT-2 (transformers' Conv1D projections) trained here on
real English, quantised weights-only, scored by perplexity on held-out sentences.

No pretrained GPT-2 is available offline, so one is trained with a fixed seed: a byte-level
BPE tokenizer (``--vocab`` tokens) and a ``--layers``-layer, ``--width``-wide GPT-2 (dropout 0.1,
weight decay 0.1, ``--train-steps`` AdamW steps in batches of 32, on one torch thread so that the
weights do not depend on ``--threads``) on 2500 packaged sentences: the calibration pool (as
GPTQ calibrates on text of the training distribution) and the first 1500 of the evaluation
pool.  The checkpoint is saved as a
transformers folder in ``~/.cache/qround/gpt2`` (reused when the recipe is the same), which
``qround quantize --model FOLDER`` also takes.  Calibration: the first
``--calib-sentences`` sentences of the calibration pool.  Evaluation: perplexity on the last
500 sentences of the evaluation pool, which training never saw.

    python benchmarks/e2e_gpt2.py --json results/e2e_gpt2.json
    python benchmarks/e2e_gpt2.py --bits W3 --methods rtn-mse,gptq,solvers --solvers fast

Methods as in ``e2e_minilm.py``: ``rtn-minmax`` / ``rtn-mse``, ``gptq`` (the real GPTQ,
``qround.baselines.gptq_model``), ``hopfield``, ``solvers`` (``quantize_model`` with each spec
of ``--solvers``) and ``reconstruct`` (the same, then block reconstruction of the transformer
blocks, weights only, ``--rec-iterations`` Adam steps per block).  Every Conv1D layer is
quantised (the LM head shares the embedding's weight and stays in float); per-channel
symmetric grids.  ``seconds``: wall time of the quantisation call.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

import torch

from qround import zoo
from qround.baselines import gptq_model, rtn_model
from qround.report import format_table
from qround.zoo.hf import load_hf, perplexity
from _common import (e2e_finish, e2e_parser, e2e_write, plan, refits_of,  # noqa: E402 (on sys.path)
                     set_threads, warm_up_solvers)

WIDTHS = {"W4": (4, None), "W3": (3, None), "W3g64": (3, 64), "W2g64": (2, 64)}
METHODS = ("rtn-minmax", "rtn-mse", "gptq", "hopfield", "solvers", "reconstruct")
TRAIN_SENTENCES = 1500    # evaluation pool [0, 1500): training; [1500, 2000): perplexity
RECIPE_VERSION = 3   # 3: one calibration sentence replaced (session 21; it was an
                      # evaluation sentence but for case)


def parse_args(argv=None) -> argparse.Namespace:
    p = e2e_parser(__doc__, WIDTHS, METHODS)
    p.add_argument("--calib-sentences", type=int, default=256)
    p.add_argument("--seed", type=int, default=0, help="training and quantisation seed")
    p.add_argument("--vocab", type=int, default=1024, help="BPE vocabulary (default: 1024)")
    p.add_argument("--layers", type=int, default=4, help="transformer blocks (default: 4)")
    p.add_argument("--width", type=int, default=128, help="hidden size (default: 128)")
    p.add_argument("--train-steps", type=int, default=800, help="AdamW steps (default: 800)")
    p.add_argument("--rec-iterations", type=int, default=100,
                   help="Adam steps per block of the 'reconstruct' method")
    p.add_argument("--bias-correction", action="store_true",
                   help="QuantConfig.bias_correction for the qround methods")
    return e2e_finish(p, argv, WIDTHS, METHODS)


def checkpoint(args) -> str:
    """The trained checkpoint folder for this recipe: loaded from the cache, or trained (and
    saved there) now."""
    name = (f"gpt2-v{RECIPE_VERSION}-vocab{args.vocab}-l{args.layers}-w{args.width}-"
            f"steps{args.train_steps}-seed{args.seed}")
    folder = zoo.cache_dir() / "gpt2" / name
    if (folder / "config.json").is_file():
        return str(folder)
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = zoo.sentences("calibration") + zoo.sentences("evaluation")[:TRAIN_SENTENCES]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    end = "<|endoftext|>"
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=args.vocab, special_tokens=[end],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tokenizer = transformers.GPT2TokenizerFast(tokenizer_object=tok, eos_token=end,
                                               bos_token=end, unk_token=end, pad_token=end)
    torch.manual_seed(args.seed)
    config = transformers.GPT2Config(
        n_layer=args.layers, n_embd=args.width, n_head=4, n_positions=128,
        vocab_size=len(tokenizer), bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id, resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)
    model = transformers.GPT2LMHeadModel(config)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=args.train_steps,
                                                pct_start=0.1)
    gen = torch.Generator().manual_seed(args.seed)
    encoded = tokenizer([end + t + end for t in texts], truncation=True, max_length=128)["input_ids"]
    model.train()
    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # the trained weights do not depend on --threads
    for step in range(args.train_steps):
        idx = torch.randint(len(encoded), (32,), generator=gen).tolist()
        batch = tokenizer.pad({"input_ids": [encoded[i] for i in idx]}, return_tensors="pt")
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels, use_cache=False).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 250 == 0 or step + 1 == args.train_steps:
            print(f"  train step {step}: loss {loss.item():.3f} "
                  f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    torch.set_num_threads(threads)
    for key in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):   # the saved model runs without
        setattr(model.config, key, 0.0)
    model.eval()
    # written beside, then renamed: an interrupted run leaves no half checkpoint in the cache
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if folder.exists():   # a folder without config.json: an unusable leftover
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return str(folder)


def quantise(label, spec, hf, calibration, bits, group_size, args):
    """Quantised copy of the model and the wall seconds of the call."""
    from qround.bench import extra_solvers
    from qround.pipeline import QuantConfig, quantize_model
    from qround.reconstruct import ReconstructConfig

    ours = label.startswith("qround:") or label == "hopfield"
    reconstruction = (ReconstructConfig(iterations=args.rec_iterations, seed=args.seed)
                      if label.endswith("+rec") else None)
    config = QuantConfig(wbits=bits, symmetric=True, group_size=group_size,
                         scale_method="minmax" if label == "rtn-minmax" else "mse",
                         solver=extra_solvers().get(spec, spec) if spec else "nearest",
                         device=args.device, seed=args.seed, inputs=args.inputs,
                         correction=args.correction, progress=args.progress,
                         reconstruction=reconstruction,
                         refits=refits_of(label) if spec else 0,
                         bias_correction=args.bias_correction and ours,
                         widen=args.widen and bool(spec))
    start = time.perf_counter()
    if label.startswith("rtn"):
        qmodel, _ = rtn_model(hf.model, config, example=calibration[0], forward=hf.forward)
    elif label == "gptq":
        qmodel, _ = gptq_model(hf.model, calibration, config, forward=hf.forward)
    else:
        qmodel = quantize_model(hf.model, calibration, config, forward=hf.forward).model
    return qmodel, time.perf_counter() - start


def main(argv=None) -> int:
    args = parse_args(argv)
    set_threads(args.threads)
    warm_up_solvers(args.solvers)   # kernel loading stays out of the first row's seconds
    folder = checkpoint(args)
    hf = load_hf(folder)
    calibration = hf.batches(zoo.sentences("calibration", args.calib_sentences))
    held_out = hf.batches(zoo.sentences("evaluation")[TRAIN_SENTENCES:])
    float_ppl = perplexity(hf.model, held_out)
    runs, notes = plan(args)
    header = (f"GPT-2 e2e: {args.layers} blocks x {args.width} wide, vocabulary {args.vocab}, "
              f"trained {args.train_steps} steps on {1000 + TRAIN_SENTENCES} packaged sentences "
              f"(seed {args.seed}; {folder}); weights only, every Conv1D layer, per-channel "
              f"symmetric; calibration {args.calib_sentences} sentences; perplexity on "
              f"{len(zoo.sentences('evaluation')) - TRAIN_SENTENCES} held-out sentences "
              f"(float {float_ppl:.3f}); torch and numba threads {args.threads}, device {args.device}")
    print(header, flush=True)
    for note in notes:
        print(f"note: {note}", flush=True)
    rows: list[dict] = []

    def save() -> None:
        e2e_write(args.json, "e2e_gpt2", header, notes, args, rows, float_perplexity=float_ppl)

    for width in args.bits:
        bits, group_size = WIDTHS[width]
        for label, spec in runs:
            qmodel, seconds = quantise(label, spec, hf, calibration, bits, group_size, args)
            ppl = perplexity(qmodel, held_out)
            rows.append({"weights": width, "method": label, "perplexity": ppl,
                         "ratio_to_float": ppl / float_ppl, "seconds": seconds})
            print(f"  {width:6s} {label:24s} perplexity {ppl:9.3f}  ({ppl / float_ppl:.4f} x "
                  f"float)  {seconds:7.1f} s", file=sys.stderr, flush=True)
            save()
            del qmodel
    print(format_table(rows, ["weights", "method", "perplexity", "ratio_to_float", "seconds"]))
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
