"""Tokenizers through the ``tokenizers`` library: BERT WordPiece (uncased) and XLM-R SentencePiece.

The bert-base-uncased vocabulary ships with the package (``assets/bert-base-uncased-vocab.txt``,
30,522 entries, md5 64800d5d8528ce344256daf115d4965e), so nothing is downloaded. Texts become
``[CLS] wordpieces [SEP]`` rows padded with ``[PAD]`` (id 0), as the official code feeds BERT.

XLM-R (and other RoBERTa-family) tokenizers come from a Hugging Face model directory
(``SentencePieceTokenizer``): its ``tokenizer.json`` through ``tokenizers``, or XLM-R's
``sentencepiece.bpe.model`` through the ``sentencepiece`` library. ``load_tokenizer`` picks the right
one from a config value or directory; both classes have the same interface.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

ASSETS = Path(__file__).parent / "assets"
VOCAB_FILE_NAME = "vocab.txt"
BUNDLED_VOCABS = {"bert-base-uncased": ASSETS / "bert-base-uncased-vocab.txt"}
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


class WordPieceTokenizer:
    def __init__(self, vocab_file: str | Path, lowercase: bool = True):
        self.vocab_file = Path(vocab_file)
        if not self.vocab_file.exists():
            raise FileNotFoundError(f"vocabulary file not found: {self.vocab_file}")
        tokens = self.vocab_file.read_text(encoding="utf-8").splitlines()
        self.vocab = {tok: i for i, tok in enumerate(tokens)}
        missing = [t for t in SPECIAL_TOKENS if t not in self.vocab]
        if missing:
            raise ValueError(f"{self.vocab_file}: special tokens {missing} are not in the vocabulary")
        tok = _HFTokenizer(models.WordPiece(self.vocab, unk_token="[UNK]", max_input_chars_per_word=100))
        tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lowercase)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        self.pad_token_id = self.vocab["[PAD]"]
        self.unk_token_id = self.vocab["[UNK]"]
        self.cls_token_id = self.vocab["[CLS]"]
        self.sep_token_id = self.vocab["[SEP]"]
        self.mask_token_id = self.vocab["[MASK]"]
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", self.cls_token_id), ("[SEP]", self.sep_token_id)]
        )
        tok.decoder = decoders.WordPiece(prefix="##")
        tok.add_special_tokens(list(SPECIAL_TOKENS))
        self._tok = tok
        self.id_to_token = tokens

    @classmethod
    def from_name_or_path(cls, name_or_path: str | Path) -> "WordPieceTokenizer":
        """A bundled vocabulary by name, a vocab file, or a directory holding ``vocab.txt``."""
        if str(name_or_path) in BUNDLED_VOCABS:
            return cls(BUNDLED_VOCABS[str(name_or_path)])
        path = Path(name_or_path)
        if path.is_dir():
            path = path / VOCAB_FILE_NAME
        if not path.exists():
            raise FileNotFoundError(
                f"tokenizer {str(name_or_path)!r}: not a bundled vocabulary ({sorted(BUNDLED_VOCABS)}) and no file at {path}"
            )
        return cls(path)

    @property
    def vocab_size(self) -> int:
        return len(self.id_to_token)

    @property
    def special_ids(self) -> set[int]:
        """Ids never used as random MLM replacements: the special tokens and every [unusedN]."""
        from x2vlm.data.masking import special_ids_from_vocab

        return set(special_ids_from_vocab(self.vocab))

    def tokenize(self, text: str) -> list[str]:
        """Wordpieces without [CLS]/[SEP]."""
        return self._tok.encode(text, add_special_tokens=False).tokens

    def encode_one(self, text: str, max_length: int | None = None) -> list[int]:
        """``[CLS] ... [SEP]`` ids, truncated to ``max_length`` (keeping the final [SEP])."""
        ids = self._tok.encode(text).ids
        if max_length is not None and len(ids) > max_length:
            ids = ids[: max_length - 1] + [self.sep_token_id]
        return ids

    def __call__(
        self, texts: str | list[str], max_length: int | None = None, pad_to: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch of texts -> (ids, attention mask), padded to the longest row or to ``pad_to``."""
        if isinstance(texts, str):
            texts = [texts]
        rows = [self.encode_one(t, max_length) for t in texts]
        width = max(pad_to or 0, max(len(r) for r in rows))
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        return ids, mask

    def decode(self, ids: list[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    @property
    def files(self) -> dict[str, Path]:
        """Files that reproduce this tokenizer in a model directory: name -> source path."""
        return {VOCAB_FILE_NAME: self.vocab_file}

    def save(self, directory: str | Path) -> Path:
        target = Path(directory) / VOCAB_FILE_NAME
        target.write_text("\n".join(self.id_to_token) + "\n", encoding="utf-8")
        return target


# -- SentencePiece (XLM-R) and other Hugging Face ``tokenizer.json`` tokenizers ------------------------
TOKENIZER_JSON_NAME = "tokenizer.json"
SENTENCEPIECE_MODEL_NAME = "sentencepiece.bpe.model"  # XLM-R's name; the model inside is a unigram model

# XLM-R's fairseq dictionary: these four first, then SentencePiece id i (i >= 3) at i + 1, <mask> last.
FAIRSEQ_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")
MASK_TOKEN = "<mask>"
SENTENCEPIECE_HEAD = ("<unk>", "<s>", "</s>")  # SentencePiece ids 0-2 of XLM-R's model (unk_id=0, bos_id=1, eos_id=2)


class TokenizerJsonBackend:
    """Pieces and ids of a Hugging Face ``tokenizer.json`` through the ``tokenizers`` library."""

    def __init__(self, tokenizer: _HFTokenizer):
        self._tok = tokenizer
        self._tok.no_truncation()  # Hugging Face saves whatever truncation/padding was last used
        self._tok.no_padding()

    def vocab(self) -> dict[str, int]:
        return self._tok.get_vocab(with_added_tokens=True)

    def ids(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def pieces(self, text: str) -> list[str]:
        return self._tok.encode(text, add_special_tokens=False).tokens

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)


class SentencePieceModelBackend:
    """XLM-R's ``sentencepiece.bpe.model`` through the ``sentencepiece`` library, with the fairseq
    id layout XLM-R's embeddings use: ``<s>``=0, ``<pad>``=1, ``</s>``=2, ``<unk>``=3, SentencePiece
    piece ``i`` (i >= 3) at ``i + 1``, ``<mask>`` the last id.

    The five special tokens written in a text are matched as tokens (as Hugging Face does); the text
    between them goes through SentencePiece, whose unknown piece becomes ``<unk>``."""

    def __init__(self, path: str | Path, model_bytes: bytes | None = None):
        import sentencepiece

        self.path = Path(path)
        if model_bytes is None:
            if not self.path.exists():
                raise FileNotFoundError(f"SentencePiece model not found: {self.path}")
            model_bytes = self.path.read_bytes()
        self._model_bytes = model_bytes
        self._processor = sentencepiece.SentencePieceProcessor()
        try:
            self._processor.LoadFromSerializedProto(model_bytes)
        except (RuntimeError, OSError, TypeError) as err:  # sentencepiece reports a parse failure as RuntimeError
            raise ValueError(f"{self.path}: not a SentencePiece model file ({err})") from err
        head = tuple(self._processor.id_to_piece(i) for i in range(min(3, self._processor.get_piece_size())))
        if head != SENTENCEPIECE_HEAD:
            raise ValueError(f"{self.path}: SentencePiece ids 0-2 are {list(head)}, expected {list(SENTENCEPIECE_HEAD)} (XLM-R layout)")
        pieces = [self._processor.id_to_piece(i) for i in range(3, self._processor.get_piece_size())]
        self.tokens = [*FAIRSEQ_SPECIALS, *pieces, MASK_TOKEN]
        self.unk_id = FAIRSEQ_SPECIALS.index("<unk>")
        self.special_token_ids = {token: i for i, token in enumerate(self.tokens) if token in (*FAIRSEQ_SPECIALS, MASK_TOKEN)}
        self.special_ids = set(self.special_token_ids.values())
        self._special_pattern = re.compile("(" + "|".join(re.escape(t) for t in self.special_token_ids) + ")")

    def __getstate__(self) -> dict:
        """Picklable (data-loader workers): the processor is rebuilt from the model's bytes."""
        return {"path": self.path, "model_bytes": self._model_bytes}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"], state["model_bytes"])

    def vocab(self) -> dict[str, int]:
        return {token: i for i, token in enumerate(self.tokens)}

    def _fairseq_id(self, piece_id: int) -> int:
        return self.unk_id if piece_id == self._processor.unk_id() else piece_id + 1

    def ids(self, text: str) -> list[int]:
        out: list[int] = []
        for k, part in enumerate(self._special_pattern.split(text)):
            if k % 2:  # a special token written in the text
                out.append(self.special_token_ids[part])
            elif part:
                out.extend(self._fairseq_id(i) for i in self._processor.encode(part))
        return out

    def pieces(self, text: str) -> list[str]:
        return [self.tokens[i] for i in self.ids(text)]

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        """The pieces joined with ``▁`` read as a space and the text's first space dropped, as Hugging
        Face's XLM-R tokenizer decodes (``sentencepiece``'s own decoding would also drop the space
        of a ``▁`` piece left first by a skipped ``<unk>``)."""
        kept = [i for i in ids if not (skip_special_tokens and i in self.special_ids)]
        text = "".join(self.tokens[i] for i in kept).replace("\u2581", " ")
        return text[1:] if text.startswith(" ") else text


def _special_token_names(directory: Path) -> dict[str, str]:
    """Special-token strings from ``tokenizer_config.json`` when present, else XLM-R's."""
    names = {"cls": "<s>", "sep": "</s>", "pad": "<pad>", "unk": "<unk>", "mask": MASK_TOKEN}
    config = directory / "tokenizer_config.json"
    if config.exists():
        data = json.loads(config.read_text())
        for role in names:
            value = data.get(f"{role}_token")
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str):
                names[role] = value
    return names


class SentencePieceTokenizer:
    """XLM-R (and other RoBERTa-family) tokenizer with the interface of ``WordPieceTokenizer``.

    Built from a Hugging Face ``tokenizer.json`` (any model type ``tokenizers`` reads: XLM-R's
    unigram, RoBERTa's byte-level BPE) or from XLM-R's ``sentencepiece.bpe.model`` (through the
    ``sentencepiece`` library, see ``SentencePieceModelBackend``). Texts become ``<s> pieces </s>``
    rows padded with ``<pad>``; the special tokens are looked up by name (``tokenizer_config.json``
    may rename them).
    """

    def __init__(self, backend: TokenizerJsonBackend | SentencePieceModelBackend, source: Path,
                 special_names: dict[str, str] | None = None):
        self._backend = backend
        self.source = source
        self.vocab = backend.vocab()
        names = special_names or _special_token_names(source.parent)
        for role, token in names.items():
            token_id = self.vocab.get(token)
            if token_id is None:
                raise ValueError(f"{source}: the {role} token {token!r} is not in the vocabulary")
            setattr(self, f"{role}_token_id", token_id)
        self.special_tokens = dict(names)

    @classmethod
    def from_tokenizer_json(cls, path: str | Path) -> "SentencePieceTokenizer":
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        try:
            tok = _HFTokenizer.from_file(str(path))
        except Exception as err:  # tokenizers raises its own exception type for malformed files
            raise ValueError(f"{path}: not a readable tokenizer.json ({err})") from err
        return cls(TokenizerJsonBackend(tok), path)

    @classmethod
    def from_sentencepiece_model(cls, path: str | Path) -> "SentencePieceTokenizer":
        path = Path(path)
        return cls(SentencePieceModelBackend(path), path)

    @classmethod
    def from_directory(cls, directory: str | Path) -> "SentencePieceTokenizer":
        """``tokenizer.json`` when the directory has one, else ``sentencepiece.bpe.model``."""
        directory = Path(directory)
        if (directory / TOKENIZER_JSON_NAME).exists():
            return cls.from_tokenizer_json(directory / TOKENIZER_JSON_NAME)
        if (directory / SENTENCEPIECE_MODEL_NAME).exists():
            return cls.from_sentencepiece_model(directory / SENTENCEPIECE_MODEL_NAME)
        raise FileNotFoundError(f"{directory}: no {TOKENIZER_JSON_NAME} or {SENTENCEPIECE_MODEL_NAME}")

    @property
    def vocab_file(self) -> Path:
        """The file the tokenizer was read from (``save`` writes it back under the same name)."""
        return self.source

    @property
    def files(self) -> dict[str, Path]:
        """Files that reproduce this tokenizer in a model directory: name -> source path."""
        found = {self.source.name: self.source}
        config = self.source.parent / "tokenizer_config.json"
        if config.exists():
            found[config.name] = config
        return found

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def special_ids(self) -> set[int]:
        """Ids never used as random MLM replacements: the five special tokens and every ``<...>`` token."""
        from x2vlm.data.masking import special_ids_from_vocab

        named = {self.pad_token_id, self.unk_token_id, self.cls_token_id, self.sep_token_id, self.mask_token_id}
        return named | set(special_ids_from_vocab(self.vocab))

    def tokenize(self, text: str) -> list[str]:
        """Pieces without ``<s>``/``</s>``."""
        return self._backend.pieces(text)

    def encode_one(self, text: str, max_length: int | None = None) -> list[int]:
        """``<s> ... </s>`` ids, truncated to ``max_length`` (keeping the final ``</s>``)."""
        ids = [self.cls_token_id, *self._backend.ids(text), self.sep_token_id]
        if max_length is not None and len(ids) > max_length:
            ids = ids[: max_length - 1] + [self.sep_token_id]
        return ids

    def __call__(
        self, texts: str | list[str], max_length: int | None = None, pad_to: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch of texts -> (ids, attention mask), padded to the longest row or to ``pad_to``."""
        if isinstance(texts, str):
            texts = [texts]
        return pad_rows([self.encode_one(t, max_length) for t in texts], self.pad_token_id, pad_to)

    def decode(self, ids: list[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self._backend.decode(ids, skip_special_tokens)

    def save(self, directory: str | Path) -> Path:
        """Copy the tokenizer's files into ``directory``; returns the main one."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for name, src in self.files.items():
            (directory / name).write_bytes(src.read_bytes())
        return directory / self.source.name


def pad_rows(rows: list[list[int]], pad_id: int, pad_to: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Id rows -> (ids, 0/1 mask), right-padded with ``pad_id`` to the longest row or ``pad_to``."""
    width = max(pad_to or 0, max(len(r) for r in rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids, mask


# -- choosing a tokenizer --------------------------------------------------------------------------
def _tokenizer_json_model_type(path: Path) -> str | None:
    """The ``model.type`` of a ``tokenizer.json`` (``WordPiece``, ``Unigram``, ``BPE`` ...)."""
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("model", {}).get("type")
    except (json.JSONDecodeError, AttributeError):
        return None


def has_tokenizer_files(directory: str | Path) -> bool:
    """Whether ``directory`` holds a tokenizer ``load_tokenizer`` can read."""
    directory = Path(directory)
    return any((directory / name).exists() for name in (TOKENIZER_JSON_NAME, SENTENCEPIECE_MODEL_NAME, VOCAB_FILE_NAME))


def load_tokenizer(name_or_path: str | Path) -> "WordPieceTokenizer | SentencePieceTokenizer":
    """The tokenizer a config value or model directory names.

    - a bundled vocabulary name (``bert-base-uncased``) or a ``vocab.txt`` file: WordPiece;
    - a ``.model`` file: XLM-R SentencePiece; a ``.json`` file: a Hugging Face ``tokenizer.json``;
    - a directory: its ``tokenizer.json`` unless that is a WordPiece one, else its
      ``sentencepiece.bpe.model``, else its ``vocab.txt`` (WordPiece, lower-cased unless
      ``tokenizer_config.json`` says ``do_lower_case: false``).
    """
    if str(name_or_path) in BUNDLED_VOCABS:
        return WordPieceTokenizer(BUNDLED_VOCABS[str(name_or_path)])
    path = Path(name_or_path)
    if path.is_dir():
        tokenizer_json = path / TOKENIZER_JSON_NAME
        if tokenizer_json.exists() and _tokenizer_json_model_type(tokenizer_json) != "WordPiece":
            return SentencePieceTokenizer.from_tokenizer_json(tokenizer_json)
        if (path / SENTENCEPIECE_MODEL_NAME).exists():
            return SentencePieceTokenizer.from_sentencepiece_model(path / SENTENCEPIECE_MODEL_NAME)
        if (path / VOCAB_FILE_NAME).exists():
            lowercase = True
            config = path / "tokenizer_config.json"
            if config.exists():
                lowercase = bool(json.loads(config.read_text()).get("do_lower_case", True))
            return WordPieceTokenizer(path / VOCAB_FILE_NAME, lowercase=lowercase)
        raise FileNotFoundError(
            f"tokenizer directory {path}: no {TOKENIZER_JSON_NAME}, {SENTENCEPIECE_MODEL_NAME} or {VOCAB_FILE_NAME}"
        )
    if not path.exists():
        raise FileNotFoundError(
            f"tokenizer {str(name_or_path)!r}: not a bundled vocabulary ({sorted(BUNDLED_VOCABS)}) and no file at {path}"
        )
    if path.suffix == ".model":
        return SentencePieceTokenizer.from_sentencepiece_model(path)
    if path.suffix == ".json":
        return SentencePieceTokenizer.from_tokenizer_json(path)
    return WordPieceTokenizer(path)


Tokenizer = WordPieceTokenizer | SentencePieceTokenizer


def model_tokenizer(directory: str | Path | None, configured: str | Path) -> Tokenizer:
    """The tokenizer of a model: the tokenizer files saved in its ``directory`` (``vocab.txt``,
    ``tokenizer.json`` or ``sentencepiece.bpe.model``) when it has them, else the one its config's
    ``tokenizer`` field names (``configured``)."""
    if directory is not None and has_tokenizer_files(directory):
        return load_tokenizer(directory)
    return load_tokenizer(configured)
