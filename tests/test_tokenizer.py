"""kiln.tokenizer against transformers' AutoTokenizer, on tokenizers trained locally on stdlib sources."""

import json
import os
import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from kiln.errors import KilnError
from kiln.tokenizer import Tokenizer
from kiln.tokenizer_training import train_bpe, train_bpe_from_iterator

transformers = pytest.importorskip("transformers")

STDLIB = Path(os.__file__).parent
CORPUS = [STDLIB / "os.py", *sorted((STDLIB / "json").glob("*.py"))]

LLAMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim"
    " + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '[SYS]' + message['content'] + '[/SYS]' }}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only system, user and assistant roles are supported!') }}"
    "{% endif %}{% endfor %}"
)

TEXTS = [
    "Hello, world!",
    "  leading spaces,\ttabs\n\nand newlines  ",
    "naïve café résumé — “quotes” «guillemets»",
    "emoji 🦀🙂👍🏽 and a family 👨‍👩‍👧",
    "中文字符和日本語のテキスト、한국어",
    "combining: e\u0301 a\u0308 o\u0302 n\u0303",
    "def f(x):\n    return x ** 2  # comment",
    "",
    "specials <|endoftext|> inside <s> text </s> <|im_end|>",
]
CONVERSATIONS = [
    [{"role": "user", "content": "Hi!"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And 3+3?"},
    ],
    [
        {"role": "user", "content": "Traduis « crème brûlée » 🍮 en 中文"},
        {"role": "assistant", "content": "焦糖布丁 🍮, e\u0301"},
    ],
]


def _train_backend(backend: BackendTokenizer, special_tokens: list[str], alphabet: list[str]) -> None:
    trainer = trainers.BpeTrainer(
        vocab_size=800, special_tokens=special_tokens, initial_alphabet=alphabet, show_progress=False
    )
    backend.train([str(path) for path in CORPUS], trainer)


def _byte_level(special_tokens: list[str]) -> BackendTokenizer:
    backend = BackendTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    _train_backend(backend, special_tokens, pre_tokenizers.ByteLevel.alphabet())
    return backend


def _write(directory: Path, backend_json: str, config: dict, **files: object) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.json").write_text(backend_json)
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    for name, content in files.items():
        text = content if isinstance(content, str) else json.dumps(content)
        (directory / name.replace("__", ".")).write_text(text)
    return directory


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("trained")
    train_bpe(CORPUS, vocab_size=1000, output_dir=out, show_progress=False)
    return out


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """GPT-2 style: no BOS, no chat template; <|endoftext|> is only in the model vocab, as in GPT-2's file."""
    backend = _byte_level(["<|endoftext|>"])
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    data = json.loads(backend.to_str())
    data["added_tokens"] = []  # the config alone makes it special, as transformers does
    config = {name: "<|endoftext|>" for name in ("bos_token", "eos_token", "unk_token")}
    config |= {"tokenizer_class": "GPT2Tokenizer", "add_prefix_space": False, "model_max_length": 1024}
    return _write(tmp_path_factory.mktemp("gpt2"), json.dumps(data), config)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Llama-3 style: byte-level BPE, BOS from a TemplateProcessing post-processor, a template file."""
    special = [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
    ]
    backend = _byte_level(special)
    bos_id = backend.token_to_id("<|begin_of_text|>")
    backend.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A",
        pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", bos_id)],
    )
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": {"content": "<|begin_of_text|>", "special": True, "__type": "AddedToken"},
        "eos_token": "<|eot_id|>",
        "add_bos_token": True,
    }
    eos_ids = [backend.token_to_id("<|end_of_text|>"), backend.token_to_id("<|eot_id|>")]
    return _write(
        tmp_path_factory.mktemp("llama"),
        backend.to_str(),
        config,
        chat_template__jinja=LLAMA_TEMPLATE,
        generation_config__json={"eos_token_id": eos_ids},
    )


@pytest.fixture(scope="module")
def mistral_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SentencePiece style: Metaspace, <0xNN> byte fallback, a decoder that strips the leading space, BOS."""
    backend = BackendTokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    _train_backend(backend, ["<unk>", "<s>", "</s>"], [])
    data = json.loads(backend.to_str())
    vocab = data["model"]["vocab"]
    for byte in range(256):  # byte-fallback tokens live in the model vocab, not among the added tokens
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    backend = BackendTokenizer.from_str(json.dumps(data))
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "chat_template": [
            {"name": "default", "template": MISTRAL_TEMPLATE},
            {"name": "rag", "template": "x"},
        ],
    }
    return _write(tmp_path_factory.mktemp("mistral"), backend.to_str(), config)


ALL_DIRS = ["trained_dir", "gpt2_dir", "llama_dir", "mistral_dir"]
CHAT_DIRS = ["trained_dir", "llama_dir", "mistral_dir"]


def _load(request: pytest.FixtureRequest, fixture: str) -> tuple[Tokenizer, object]:
    directory = request.getfixturevalue(fixture)
    return Tokenizer.from_dir(directory), transformers.AutoTokenizer.from_pretrained(str(directory))


@pytest.mark.parametrize("fixture", ALL_DIRS)
def test_encode_decode_match_transformers(request: pytest.FixtureRequest, fixture: str) -> None:
    tokenizer, reference = _load(request, fixture)
    assert tokenizer.vocab_size == len(reference)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (
        reference.bos_token_id,
        reference.eos_token_id,
    )
    for text in TEXTS:
        for add_special_tokens in (True, False):
            expected = reference(text, add_special_tokens=add_special_tokens)["input_ids"]
            assert tokenizer.encode(text, add_special_tokens=add_special_tokens) == expected, text
        ids = tokenizer.encode(text) + [tokenizer.eos_token_id]
        for skip_special_tokens in (True, False):
            expected_text = reference.decode(ids, skip_special_tokens=skip_special_tokens)
            assert tokenizer.decode(ids, skip_special_tokens=skip_special_tokens) == expected_text
    assert tokenizer.encode_batch(TEXTS) == [tokenizer.encode(text) for text in TEXTS]


def test_bos_follows_the_post_processor_as_in_transformers(
    gpt2_dir: Path, llama_dir: Path, tmp_path: Path
) -> None:
    llama = Tokenizer.from_dir(llama_dir)
    assert llama.add_bos_token and llama.encode("hi")[0] == llama.bos_token_id
    gpt2 = Tokenizer.from_dir(gpt2_dir)
    assert not gpt2.add_bos_token and gpt2.encode("hi") == gpt2.encode("hi", add_special_tokens=False)
    # transformers 5 drops add_bos_token/add_eos_token from tokenizer_config.json next to a tokenizer.json:
    # with a post-processor that adds no BOS, add_bos_token=true adds nothing.
    backend = BackendTokenizer.from_file(str(llama_dir / "tokenizer.json"))
    backend.post_processor = processors.ByteLevel(trim_offsets=True)
    config = json.loads((llama_dir / "tokenizer_config.json").read_text())
    _write(tmp_path, backend.to_str(), config | {"add_bos_token": True, "add_eos_token": True})
    reference = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    tokenizer = Tokenizer.from_dir(tmp_path)
    assert tokenizer.encode("hi there") == reference("hi there")["input_ids"]
    assert not tokenizer.add_bos_token and tokenizer.bos_token_id not in tokenizer.encode("hi there")


@pytest.mark.parametrize("fixture", CHAT_DIRS)
def test_chat_template_matches_transformers(request: pytest.FixtureRequest, fixture: str) -> None:
    tokenizer, reference = _load(request, fixture)
    for messages in CONVERSATIONS:
        for add_generation_prompt in (True, False):
            kwargs = {"add_generation_prompt": add_generation_prompt}
            text = tokenizer.apply_chat_template(messages, **kwargs)
            assert text == reference.apply_chat_template(messages, tokenize=False, **kwargs)
            ids = tokenizer.apply_chat_template(messages, tokenize=True, **kwargs)
            assert ids == reference.apply_chat_template(messages, tokenize=True, **kwargs)["input_ids"]
            assert tokenizer.decode(ids, skip_special_tokens=False) == text


def test_template_features_match_transformers(trained_dir: Path) -> None:
    tokenizer = Tokenizer.from_dir(trained_dir)
    reference = transformers.AutoTokenizer.from_pretrained(str(trained_dir))
    template = (
        "{% set ns = namespace(count=0) %}{% for message in messages %}{% set ns.count = ns.count + 1 %}"
        "{% if loop.index > 2 %}{% break %}{% endif %}"
        "{% generation %}{{ message | tojson }}{% endgeneration %}\n{% endfor %}"
        "{{ ns.count }} {{ eos_token }} {{ flavour }} {{ tools is none }} {{ strftime_now('%Y') }}"
    )
    tokenizer.chat_template = reference.chat_template = template
    messages = CONVERSATIONS[1] + [{"role": "user", "content": "<b>&'\"é🦀"}]
    expected = reference.apply_chat_template(messages, tokenize=False, flavour="mint")
    assert tokenizer.apply_chat_template(messages, add_generation_prompt=False, flavour="mint") == expected


def test_loading_reads_the_side_files(llama_dir: Path, mistral_dir: Path) -> None:
    llama = Tokenizer.from_dir(llama_dir)
    assert llama.bos_token == "<|begin_of_text|>" and llama.eos_token == "<|eot_id|>"
    assert llama.chat_template == LLAMA_TEMPLATE
    assert llama.eos_token_ids == {llama.token_to_id("<|end_of_text|>"), llama.token_to_id("<|eot_id|>")}
    assert llama.pad_token is None and llama.pad_token_id is None
    mistral = Tokenizer.from_dir(mistral_dir)
    assert mistral.chat_template == MISTRAL_TEMPLATE  # "default" out of the named templates
    assert mistral.id_to_token(mistral.bos_token_id) == "<s>"


@pytest.mark.parametrize("fixture", CHAT_DIRS)
def test_save_round_trips_through_transformers(
    request: pytest.FixtureRequest, fixture: str, tmp_path: Path
) -> None:
    original = Tokenizer.from_dir(request.getfixturevalue(fixture))
    original.save(tmp_path)
    reloaded = Tokenizer.from_dir(tmp_path)
    reference = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for text in TEXTS:
        assert reloaded.encode(text) == original.encode(text) == reference(text)["input_ids"]
    messages = CONVERSATIONS[1]
    assert reloaded.apply_chat_template(messages) == original.apply_chat_template(messages)
    assert reloaded.apply_chat_template(messages) == reference.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    assert (
        reloaded.add_bos_token
        == json.loads((tmp_path / "tokenizer_config.json").read_text())["add_bos_token"]
    )


def _stream(tokenizer: Tokenizer, ids: list[int], skip_special_tokens: bool) -> list[str]:
    decoder = tokenizer.incremental_decoder(skip_special_tokens=skip_special_tokens)
    deltas = [decoder.add(token_id) for token_id in ids]
    deltas.append(decoder.flush())
    assert decoder.token_ids == ids
    assert decoder.text == "".join(deltas)
    return deltas


@pytest.mark.parametrize("fixture", ALL_DIRS)
def test_incremental_decoder_matches_decode(request: pytest.FixtureRequest, fixture: str) -> None:
    tokenizer = Tokenizer.from_dir(request.getfixturevalue(fixture))
    texts = TEXTS + ["🦀" * 5 + "世界" + "e\u0301" * 3 + " 👨‍👩‍👧 ok"]
    for text in texts:
        ids = (
            tokenizer.encode(text)
            + [tokenizer.eos_token_id]
            + tokenizer.encode(text, add_special_tokens=False)
        )
        for skip_special_tokens in (True, False):
            deltas = _stream(tokenizer, ids, skip_special_tokens)
            assert not any("\ufffd" in delta for delta in deltas), deltas
            assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


@pytest.mark.parametrize("fixture", ["trained_dir", "mistral_dir"])
def test_incremental_decoder_holds_back_a_split_character(
    request: pytest.FixtureRequest, fixture: str
) -> None:
    tokenizer = Tokenizer.from_dir(request.getfixturevalue(fixture))
    ids = tokenizer.encode("🦀", add_special_tokens=False)
    assert len(ids) > 1, "the crab must span several byte tokens for this test"
    decoder = tokenizer.incremental_decoder()
    assert [decoder.add(token_id) for token_id in ids[:-1]] == [""] * (len(ids) - 1)
    assert decoder.add(ids[-1]) == "🦀"
    cut = tokenizer.incremental_decoder()
    for token_id in ids[:-1]:
        cut.add(token_id)
    assert cut.flush() == tokenizer.decode(ids[:-1])  # an unfinished stream ends as decode() renders it


def test_incremental_decoder_keeps_spaces_after_a_prompt(mistral_dir: Path) -> None:
    tokenizer = Tokenizer.from_dir(mistral_dir)
    prompt_ids = tokenizer.encode("The answer is")
    all_ids = tokenizer.encode("The answer is forty two")
    generated = all_ids[len(prompt_ids) :]
    assert all_ids[: len(prompt_ids)] == prompt_ids
    decoder = tokenizer.incremental_decoder(prompt_ids=prompt_ids)
    text = "".join(decoder.add(token_id) for token_id in generated) + decoder.flush()
    assert text == " forty two"
    assert decoder.token_ids == generated


def test_trained_tokenizer_round_trips_any_text(trained_dir: Path) -> None:
    tokenizer = Tokenizer.from_dir(trained_dir)
    assert (
        tokenizer.vocab_size == 1000
        and tokenizer.eos_token == "<|endoftext|>"
        and tokenizer.bos_token is None
    )
    rng = random.Random(0)
    samples = [bytes(rng.randrange(256) for _ in range(200)).decode("latin-1") for _ in range(5)]
    samples += [bytes(rng.randrange(256) for _ in range(200)).decode("utf-8", "replace") for _ in range(5)]
    code_points = [*range(0x20, 0x7F), *range(0xA0, 0x800), *range(0x4E00, 0x4F00), *range(0x1F300, 0x1F400)]
    samples += ["".join(chr(rng.choice(code_points)) for _ in range(300)) for _ in range(5)]
    samples += ["\x00\x01\t\r\n \u200b\ufeff\U0010ffff", " ".join(TEXTS[:-1])]
    for text in samples:
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_train_from_iterator() -> None:
    documents = [path.read_text() for path in CORPUS]
    tokenizer = train_bpe_from_iterator(iter(documents), vocab_size=600, show_progress=False)
    assert tokenizer.vocab_size == 600 and tokenizer.eos_token_ids == {0, tokenizer.token_to_id("<|im_end|>")}
    assert tokenizer.decode(tokenizer.encode(documents[0])) == documents[0]
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=True)
    assert chat[0] == tokenizer.token_to_id("<|im_start|>")


def test_missing_tokenizer_json_names_the_directory(tmp_path: Path) -> None:
    with pytest.raises(KilnError, match="tokenizer.json") as error:
        Tokenizer.from_dir(tmp_path / "model")
    assert str(tmp_path / "model") in str(error.value)


def test_chat_errors(gpt2_dir: Path, mistral_dir: Path) -> None:
    with pytest.raises(KilnError, match="no chat template"):
        Tokenizer.from_dir(gpt2_dir).apply_chat_template([{"role": "user", "content": "hi"}])
    with pytest.raises(KilnError, match="Only system, user and assistant roles are supported!"):
        Tokenizer.from_dir(mistral_dir).apply_chat_template([{"role": "tool", "content": "42"}])


def test_training_input_errors(tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(KilnError, match="at least one"):
        train_bpe([], vocab_size=500)
    with pytest.raises(KilnError, match="not found.*missing.txt"):
        train_bpe([CORPUS[0], tmp_path / "missing.txt"], vocab_size=500)
    with pytest.raises(KilnError, match="empty"):
        train_bpe([empty], vocab_size=500)
    with pytest.raises(KilnError, match="no text"):
        train_bpe_from_iterator(iter([]), vocab_size=500, show_progress=False)
    with pytest.raises(KilnError, match="at least 259"):
        train_bpe(CORPUS, vocab_size=100)
