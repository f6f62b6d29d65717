"""Build small sentence-transformers models locally: fast, deterministic, not downloaded."""

from __future__ import annotations

import shutil
from pathlib import Path


def build_tiny_model(target: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """A random-initialised 2-layer BERT (hidden size 32) with mean pooling, saved as a
    sentence-transformers folder. The same seed gives the same files."""
    if (target / "modules.json").exists():
        return target
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    from transformers import AutoTokenizer, BertConfig, BertModel

    tmp = target.with_name(target.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=512)
    bert_dir = tmp / "bert"
    BertModel(config).save_pretrained(str(bert_dir))
    tokenizer.save_pretrained(str(bert_dir))
    word = Transformer(str(bert_dir), max_seq_length=256)
    pooling = Pooling(word.get_embedding_dimension(), pooling_mode="mean")
    SentenceTransformer(modules=[word, pooling], device="cpu").save(str(tmp / "st"))
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(target, ignore_errors=True)
    (tmp / "st").rename(target)
    shutil.rmtree(tmp, ignore_errors=True)
    return target
