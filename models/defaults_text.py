"""Builders for the tiny text and tabular models of the all-tasks catalog: random weights from small configs, made
in code in a second or so, saved as the directories the ordinary loading code reads (as it reads a Hub snapshot).

They exercise the plumbing (shapes, limits, metering), not sense: a random NER model tags at random.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

_CORPUS = [
    "the cat sat on the mat",
    "paris is the capital of france",
    "my name is sarah and i live in london",
    "apple was founded by steve jobs in california",
    "the weather in berlin is cold today",
    "what is the capital of germany",
    "how many stars are in the sky",
    "the quick brown fox jumps over the lazy dog",
    "i love this movie it was great",
    "this film was terrible and boring",
    "repository stars contributors brad pitt leonardo di caprio george clooney",
    "translate this sentence into french please",
    "summarize the following article in one line",
    "le chat est sur le tapis bonjour merci",
    "numbers 1 2 3 4 5 6 7 8 9 10 36542 4512 3934 87 53 69",
] * 8

_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[EMPTY]"]


def _seed(seed: int = 0) -> None:
    import torch

    torch.manual_seed(seed)


def wordpiece_tokenizer(
    corpus: list[str] | None = None,
    vocab_size: int = 600,
    specials: list[str] | None = None,
    max_length: int = 128,
) -> Any:
    """A BERT-style WordPiece tokenizer trained in memory on `corpus` (this module's by default; offsets work: it
    is a fast tokenizer). Also the tiny vision and audio models' (models/vision_audio_defaults.py)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials or _SPECIALS)
    tok.train_from_iterator(corpus or _CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=max_length,
    )


def _bert_config(tokenizer: Any, **extra: Any) -> Any:
    from transformers import BertConfig

    return BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


def _save(model: Any, tokenizer: Any, directory: Path) -> None:
    model.save_pretrained(str(directory), safe_serialization=True)
    tokenizer.save_pretrained(str(directory))


def _labels(names: list[str]) -> dict[str, Any]:
    return {
        "num_labels": len(names),
        "id2label": dict(enumerate(names)),
        "label2id": {n: i for i, n in enumerate(names)},
    }


def build_tiny_qa(directory: Path) -> None:
    """A tiny BERT extractive question answerer (start and end logits over the context)."""
    from transformers import BertForQuestionAnswering

    _seed(1)
    tokenizer = wordpiece_tokenizer()
    _save(BertForQuestionAnswering(_bert_config(tokenizer)), tokenizer, directory)


def build_tiny_fill_mask(directory: Path) -> None:
    """A tiny BERT masked language model; its mask token is [MASK]."""
    from transformers import BertForMaskedLM

    _seed(2)
    tokenizer = wordpiece_tokenizer()
    _save(BertForMaskedLM(_bert_config(tokenizer)), tokenizer, directory)


NER_LABELS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]


def build_tiny_ner(directory: Path) -> None:
    """A tiny BERT token classifier with the CoNLL-2003 label set."""
    from transformers import BertForTokenClassification

    _seed(3)
    tokenizer = wordpiece_tokenizer()
    _save(BertForTokenClassification(_bert_config(tokenizer, **_labels(NER_LABELS))), tokenizer, directory)


def build_tiny_nli(directory: Path) -> None:
    """A tiny BERT NLI classifier (contradiction/neutral/entailment): what zero-shot classification runs on."""
    from transformers import BertForSequenceClassification

    _seed(4)
    tokenizer = wordpiece_tokenizer()
    config = _bert_config(tokenizer, **_labels(["contradiction", "neutral", "entailment"]))
    _save(BertForSequenceClassification(config), tokenizer, directory)


def _tiny_bart(seed: int, directory: Path, **generation: Any) -> None:
    from transformers import BartConfig, BartForConditionalGeneration

    _seed(seed)
    tokenizer = wordpiece_tokenizer()
    config = BartConfig(
        vocab_size=len(tokenizer),
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=37,
        decoder_ffn_dim=37,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id,
        decoder_start_token_id=tokenizer.sep_token_id,
        forced_eos_token_id=tokenizer.sep_token_id,
    )
    model = BartForConditionalGeneration(config)
    # Random weights would end at once: a few words at least, never a special token.
    model.generation_config.max_length = None
    model.generation_config.max_new_tokens = 16
    model.generation_config.min_new_tokens = 4
    model.generation_config.suppress_tokens = [
        tokenizer.convert_tokens_to_ids(t) for t in _SPECIALS if t != tokenizer.sep_token
    ]
    for key, value in generation.items():
        setattr(model.generation_config, key, value)
    _save(model, tokenizer, directory)


def build_tiny_summarizer(directory: Path) -> None:
    """A tiny BART encoder-decoder for summarization."""
    _tiny_bart(5, directory)


def build_tiny_translator(directory: Path) -> None:
    """A tiny BART encoder-decoder for translation (one language pair, as opus-mt models are)."""
    _tiny_bart(6, directory)


def build_tiny_tapas(directory: Path) -> None:
    """A tiny TAPAS table question answerer with WTQ's aggregation head (NONE, SUM, AVERAGE, COUNT)."""
    from transformers import TapasConfig, TapasForQuestionAnswering, TapasTokenizer

    _seed(7)
    vocab = sorted(wordpiece_tokenizer().get_vocab().items(), key=lambda kv: kv[1])
    directory.mkdir(parents=True, exist_ok=True)
    vocab_file = directory / "vocab.txt"
    vocab_file.write_text("".join(f"{token}\n" for token, _ in vocab))
    tokenizer = TapasTokenizer(str(vocab_file), model_max_length=128)
    config = TapasConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=128,
        num_aggregation_labels=4,
        aggregation_labels={0: "NONE", 1: "SUM", 2: "AVERAGE", 3: "COUNT"},
        use_answer_as_supervision=True,
        select_one_column=True,
        allow_empty_column_selection=False,
        cell_selection_preference=0.207951,
    )
    _save(TapasForQuestionAnswering(config), tokenizer, directory)


# Tabular: scikit-learn estimators saved with skops, laid out as the Hub's sklearn repositories are (config.json's
# `sklearn` section names the columns, the model file and the task), which is what the hosted service loaded.

WINE_COLUMNS = ["fixed_acidity", "volatile_acidity", "citric_acid", "residual_sugar", "alcohol"]
FISH_COLUMNS = ["Species", "Length1", "Length2", "Height", "Width"]


def _write_sklearn_repo(
    directory: Path, estimator: Any, columns: list[str], task: str, example: dict
) -> None:
    import sklearn
    import skops.io as sio

    directory.mkdir(parents=True, exist_ok=True)
    sio.dump(estimator, directory / "model.skops")
    config = {
        "sklearn": {
            "columns": columns,
            "environment": [f"scikit-learn={sklearn.__version__}"],
            "example_input": example,
            "model": {"file": "model.skops"},
            "task": task,
        }
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2))


def build_tiny_wine_quality(directory: Path) -> None:
    """A wine-quality classifier (integer grades 5, 6, 7) trained on synthetic rows: a logistic regression."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(0)
    x = rng.normal([7.4, 0.5, 0.3, 2.5, 10.5], [1.5, 0.2, 0.2, 1.5, 1.0], size=(300, len(WINE_COLUMNS)))
    score = x[:, 4] - 4 * x[:, 1] + rng.normal(0, 0.5, 300)
    y = np.digitize(score, np.quantile(score, [1 / 3, 2 / 3])) + 5
    import pandas as pd

    frame = pd.DataFrame(x, columns=WINE_COLUMNS)  # fitted with its columns' names, as it is then called
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500)).fit(frame, y)
    example = {c: [str(round(v, 2)) for v in x[:3, i]] for i, c in enumerate(WINE_COLUMNS)}
    _write_sklearn_repo(directory, model, WINE_COLUMNS, "tabular-classification", example)


def build_tiny_fish_weight(directory: Path) -> None:
    """A fish-weight regressor (grams) with a categorical column (Species): one-hot encoding and a linear model."""
    import numpy as np
    from sklearn.compose import make_column_transformer
    from sklearn.linear_model import LinearRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder

    rng = np.random.default_rng(1)
    species = rng.choice(["Bream", "Perch", "Pike", "Roach"], size=200)
    length = rng.uniform(10, 50, 200)
    rows = {
        "Species": species,
        "Length1": length,
        "Length2": length * 1.08,
        "Height": length * 0.3 + rng.normal(0, 1, 200),
        "Width": length * 0.15 + rng.normal(0, 0.5, 200),
    }
    import pandas as pd

    frame = pd.DataFrame(rows, columns=FISH_COLUMNS)
    weight = 0.012 * length**3 + rng.normal(0, 20, 200)
    encode = make_column_transformer(
        (OneHotEncoder(handle_unknown="ignore"), ["Species"]), remainder="passthrough"
    )
    model = make_pipeline(encode, LinearRegression()).fit(frame, weight)
    example = {c: [str(v) for v in frame[c][:3]] for c in FISH_COLUMNS}
    _write_sklearn_repo(directory, model, FISH_COLUMNS, "tabular-regression", example)
