"""Data: corpus (stdlib or user files) → tokenizer → Grain pipeline with FIM and packing (REFERENCE §9).

    tok = load_tokenizer(cfg.data)                       # trained once on the corpus and cached, or a tokenizer.json
    it = make_iterator(cfg.data, tok, batch_size=8)      # {"tokens": int32 [8, seq_len + 1]}, forever
    state = it.get_state(); it.set_state(state)          # JSON-serialisable; resumes on exactly the next batch
"""

from dsv3_jax.data.corpus import Corpus, DataError, load_corpus
from dsv3_jax.data.fim import encode_document, fim_split_points
from dsv3_jax.data.packing import PackIterDataset
from dsv3_jax.data.pipeline import DataIterator, make_dataset, make_iterator
from dsv3_jax.data.tokenizer import SPECIAL_TOKENS, Tokenizer, load_tokenizer, train_bpe

__all__ = ["SPECIAL_TOKENS", "Corpus", "DataError", "DataIterator", "PackIterDataset", "Tokenizer",
           "encode_document", "fim_split_points", "load_corpus", "load_tokenizer", "make_dataset", "make_iterator",
           "train_bpe"]
