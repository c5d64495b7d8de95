"""Long documents are tokenized in bounded pieces (issue 16, item 20) and give the same ids as the whole document
tokenized at once (the tokenizer itself is the truth). Memory is measured in bench/tokenize_memory.py."""

import pytest
import transformers

from lorafast_export.paths import DEMO_DIR, TEXT_DIR
from lorafast_export.textdata import token_ids, token_stream
from tests.tiny import save_char_tokenizer


def one_line(n_chars: int) -> str:
    """Real prose and code as a single line (no newlines): the hostile case, a 30 MB line, in small."""
    text = " ".join((TEXT_DIR / f).read_text() for f in ("prose_eval.txt", "code_eval.txt")).replace(
        "\n", " "
    )
    return (text * (n_chars // len(text) + 1))[:n_chars]


def metaspace_tokenizer(tmp_path):
    """A SentencePiece-style (Metaspace) BPE tokenizer with BOS and EOS, trained here on the bundled text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"])
    tok.train_from_iterator([(TEXT_DIR / "prose_eval.txt").read_text()], trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 2)]
    )
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def char_tokenizer(tmp_path):
    save_char_tokenizer(tmp_path / "char")
    return transformers.AutoTokenizer.from_pretrained(tmp_path / "char")


TOKENIZERS = {
    "demo-byte-level-bpe": lambda tmp_path: transformers.AutoTokenizer.from_pretrained(DEMO_DIR / "base"),
    "metaspace-bos-eos": metaspace_tokenizer,
    "char-level": char_tokenizer,
}


@pytest.mark.parametrize("name", list(TOKENIZERS))
def test_pieces_tokenize_as_the_whole(tmp_path, name):
    tok = TOKENIZERS[name](tmp_path)
    text = one_line(60_000)
    whole = tok(text)["input_ids"]
    pieces = [i for part in token_ids(tok, text, chunk_chars=1500) for i in part]
    assert pieces == whole
    assert len(list(token_ids(tok, text, chunk_chars=1500))) > 40  # it really was cut


def test_a_line_without_spaces_is_still_bounded(tmp_path):
    tok = char_tokenizer(tmp_path)
    text = "x" * 10_000
    parts = list(token_ids(tok, text, chunk_chars=1000))
    assert max(len(p) for p in parts) <= 1000
    assert [i for p in parts for i in p] == tok(text)["input_ids"]


def test_stream_stops_at_the_limit(tmp_path):
    tok = char_tokenizer(tmp_path)
    ids = token_stream(tok, [one_line(5_000_000)], limit=10_000)
    assert 10_000 <= len(ids) <= 10_000 + (1 << 18) + 1
    assert ids.tolist() == tok(one_line(len(ids) - 1))["input_ids"][: len(ids)]
