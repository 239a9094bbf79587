"""Per-user data: the shard format and batches (``shards``), and preparing shards from real text.

Modules:

* ``shards``    the on-disk format (``meta.json`` + ``user_XX/{train,valid,test}.bin``), atomic
                writing, checked memory-mapped loading of one user's splits, batch samplers;
* ``tokenizer`` GPT-2 BPE through tiktoken, or any Hugging Face tokenizer (the Llama family);
* ``documents`` reading documents from local files (AG-News CSV, one text file per category),
                text hashing for the document manifest and for overlap checks;
* ``sources``   the paper's three datasets (AG News, multilingual Wikipedia, SlimPajama) and the
                generic text source: categories, Table 3 budgets, local files or hub streams;
* ``prepare``   per-user splits (in- and out-of-distribution), budgets, writing a dataset.

``python -m comigs_dist.data prepare --dataset agnews --out data/agnews`` is the command line.
The package knows nothing of models, methods or process groups.
"""
from comigs_dist.data.shards import (FORMAT, SPLITS, BatchSampler, DataError, UserData, check_categories,
                                     check_dataset, data_fingerprint, eval_windows, iter_eval_batches, load_user_data,
                                     read_meta, sha256_file, token_dtype, write_dataset)

__all__ = ["FORMAT", "SPLITS", "BatchSampler", "DataError", "UserData", "check_categories", "check_dataset",
           "data_fingerprint", "eval_windows", "iter_eval_batches", "load_user_data", "read_meta", "sha256_file",
           "token_dtype", "write_dataset"]
