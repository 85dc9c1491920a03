"""Subcommand registry: name -> (help, add_arguments(parser), run(args) -> exit code)."""

from rdr_jax.commands import (convert, demo, generate, mine, pipeline, prepare_data, reader, rerank,
                              tokenize_corpus, train)

COMMANDS = {
    "convert": (convert.HELP, convert.add_arguments, convert.run),
    "tokenize": (tokenize_corpus.HELP, tokenize_corpus.add_arguments, tokenize_corpus.run),
    "encode": (pipeline.ENCODE_HELP, pipeline.add_encode_arguments, pipeline.run_encode),
    "index": (pipeline.INDEX_HELP, pipeline.add_index_arguments, pipeline.run_index),
    "retrieve": (pipeline.RETRIEVE_HELP, pipeline.add_retrieve_arguments, pipeline.run_retrieve),
    "evaluate": (pipeline.EVALUATE_HELP, pipeline.add_evaluate_arguments, pipeline.run_evaluate),
    "read": (reader.READ_HELP, reader.add_read_arguments, reader.run_read),
    "teacher-scores": (reader.TEACHER_HELP, reader.add_teacher_arguments, reader.run_teacher_scores),
    "mine-negatives": (mine.HELP, mine.add_arguments, mine.run),
    "rerank": (rerank.RERANK_HELP, rerank.add_rerank_arguments, rerank.run_rerank),
    "generate": (generate.HELP, generate.add_arguments, generate.run),
    "prepare-data": (prepare_data.HELP, prepare_data.add_arguments, prepare_data.run),
    "train": (train.HELP, train.add_arguments, train.run),
    "demo": (demo.HELP, demo.add_arguments, demo.run),
}
