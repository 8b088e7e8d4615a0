"""Data: `prepare` (inputs -> committed WebDataset shards) and the streaming reader (shards -> `Batch`es).

Modules, each with one job (imported directly; this package imports nothing heavy on its own):
  samples   the sample format inside shards (keys, members) and its encoder/decoder (shared with precompute)
  shards    shard tar + byte-range index writing and reading
  manifest  manifest.json and the commit of a shard folder
  sources   enumerating input folders / class trees / captions / JSONL manifests
  builtin   builtin:photo-tiles and builtin:fashion-mnist
  imaging   PIL pixel handling: load, crop, resize, encode, decode
  prepare   `prepare(src, out, ...)` -> PrepareReport
  order     the deterministic per-rank sample order
  tensors   pixels <-> tensors and the one `downsample` everyone uses
  reader    `StreamingReader`: endless, resumable, per-rank batches; `load_images` for evaluation
"""
