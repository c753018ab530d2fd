"""Chat template, modes and tokenizers: round trips for every mode with the built-in tokenizer
and with a tiny byte-level BPE tokenizer saved as a local Hugging Face directory."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from r4b.data import (MODES, BuiltinTokenizer, ChatTemplate, HFTokenizer, make_task,
                      parse_assistant, resolve_mode, sft_loss_mask)
from r4b.data.tokenizer import TEMPLATE_SPECIALS, Tokenizer

# Qwen2/Qwen3 pre-tokenizer split pattern (a public fact of that tokenizer's config).
_QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _build_hf_dir(path, *, with_image: bool = True) -> str:
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as RawTokenizer
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
    if with_image:
        specials.append("<image>")
    tok = RawTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [it.question + "\n\n" + it.reasoning + "\n\n" + it.answer
              for it in make_task(7, 200, vision=False)]
    corpus += ["user\nassistant\nWhat is the answer? So the result is 17.\n\n"] * 20
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>",
                                   additional_special_tokens=specials[1:])
    fast.save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return _build_hf_dir(tmp_path_factory.mktemp("hf_tok"))


@pytest.fixture(scope="module", params=["builtin", "hf"])
def tok(request, hf_dir) -> Tokenizer:
    return BuiltinTokenizer() if request.param == "builtin" else HFTokenizer(hf_dir)


CASES = [  # (question, n_images, answer, reasoning)
    ("sum of all?", 1, "17", "3 5 7 2\n3+5=8\n8+7=15\n15+2=17"),
    ("first digit?", 2, "3", None),
    ("3 5 7 2: what is the answer?", 0, "1/2", "So the result is 1/2."),
    ("Look <image> and say: sum of first two?", 1, "-8", "  3+5=8, negated.  "),
]


def _full_text(tpl: ChatTemplate, q, n, a, r, mode):
    return tpl.prompt_text(q, n, mode) + tpl.response_text(a, r, mode)


def test_protocol(tok):
    assert isinstance(tok, Tokenizer)
    ids = {tok.im_start_id, tok.im_end_id, tok.think_start_id, tok.think_end_id,
           tok.image_token_id, tok.eos_id}
    assert len(ids) == 6 and all(0 <= i < tok.vocab_size for i in ids)
    for s in TEMPLATE_SPECIALS:
        assert len(tok.encode(s)) == 1, s
    assert tok.encode("<think>") == [tok.think_start_id]
    assert tok.encode("</think>") == [tok.think_end_id]


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("mode", MODES)
def test_round_trip(tok, mode, case):
    q, n, a, r = CASES[case]
    if mode == "no_think":
        r = None
    if mode == "think" and r is None:
        r = "1+1=2"
    tpl = ChatTemplate(tok, tokens_per_image=3)
    p = tpl.prompt_ids(q, n, mode)
    resp = tpl.response_ids(a, r, mode)
    # prompt + response re-tokenises to the full canonical text (images expanded)
    full = _full_text(tpl, q, n, a, r, mode)
    assert p + resp == tpl.expand_images(tok.encode(full))
    assert p.count(tok.image_token_id) == 3 * n
    assert resp[-1] == tok.im_end_id and tok.im_end_id not in resp[:-1]
    # prompt of a forced mode = auto prompt + forced ids, and the prompt ends in the prefix
    assert p == tpl.prompt_ids(q, n, "auto") + tpl.forced_ids(mode)
    assert tpl.prompt_mode_of(p) == mode
    # decode keeps everything; the canonical forms of the issue
    text = tok.decode(p + resp)
    assert text == full.replace("<image>", "<image>" * 3)
    want = (f"<think>\n{r.strip()}\n</think>\n\n{a}<|im_end|>" if r
            else f"<think>\n\n</think>\n\n{a}<|im_end|>")
    assert text.endswith("<|im_start|>assistant\n" + want)
    assert tpl.assistant_text_of(resp, mode) == want
    # parse gives the fields back, from ids and from text
    for src in (resp, tok.decode(resp)):
        got = tpl.parse_response(src, mode)
        assert got.well_formed and got.finished
        assert got.mode_chosen == ("think" if r else "no_think")
        assert got.reasoning == (r.strip() if r else "")
        assert got.answer == a
    assert tpl.classify_mode(p, resp) == ("think" if r else "no_think")


def test_routing_token(tok):
    tpl = ChatTemplate(tok, 1)
    assert tpl.routing_offset == 0
    assert tpl.routing_ids["think"] == tok.encode("\n")[0]
    assert tpl.routing_ids["no_think"] == tok.encode("\n\n")[0]
    assert tpl.routing_ids["think"] != tpl.routing_ids["no_think"]
    assert tpl.forced_ids("auto") == []
    assert tpl.forced_ids("no_think")[-1] == tok.think_end_id
    # in auto mode the first response token is the routing token of the answer's form
    assert tpl.response_ids("5", "2+3=5", "auto")[0] == tpl.routing_ids["think"]
    assert tpl.response_ids("5", None, "auto")[0] == tpl.routing_ids["no_think"]


@pytest.mark.parametrize("with_reasoning", [True, False])
def test_sft_example_loss_mask(tok, with_reasoning):
    tpl = ChatTemplate(tok, tokens_per_image=4)
    r = "9 0 2 4\n9+0=9\n9+2=11\n11+4=15" if with_reasoning else None
    ex = tpl.sft_example("sum of all?", "15", r, n_images=1)
    assert ex.mode == ("think" if with_reasoning else "no_think")
    auto_prompt = tpl.prompt_ids("sum of all?", 1, "auto")
    assert ex.input_ids[:ex.prompt_len] == auto_prompt
    assert ex.input_ids[ex.prompt_len - 1] == tok.think_start_id
    assert ex.loss_mask == sft_loss_mask(len(ex.input_ids), ex.prompt_len)
    assert len(ex.loss_mask) == len(ex.input_ids)
    assert set(ex.loss_mask[:ex.prompt_len]) == {0} and set(ex.loss_mask[ex.prompt_len:]) == {1}
    trained = [t for t, m in zip(ex.input_ids, ex.loss_mask) if m]
    # the routing token, </think>, the blank lines, the answer and end of turn are all trained
    assert trained[0] == tpl.routing_ids[ex.mode]
    assert tok.think_end_id in trained and trained[-1] == tok.im_end_id
    assert tok.image_token_id not in trained
    assert "<think>" + tok.decode(trained) == tpl.assistant_text("15", r)


def test_sft_forced_prompt_ablation(tok):
    tpl = ChatTemplate(tok, 1)
    ex = tpl.sft_example("q?", "7", "3+4=7", prompt_mode="think")
    assert ex.input_ids[:ex.prompt_len] == tpl.prompt_ids("q?", 0, "think")
    assert ex.input_ids[ex.prompt_len] != tpl.routing_ids["think"]  # routing token not trained
    ex2 = tpl.sft_example("q?", "7", None, prompt_mode="short")
    assert tok.decode(ex2.input_ids[ex2.prompt_len:]) == "\n\n7<|im_end|>"
    with pytest.raises(ValueError, match="prompt_mode"):
        tpl.sft_example("q?", "7", None, prompt_mode="think")


def test_sft_loss_mask_rule_validates():
    assert sft_loss_mask(5, 2) == [0, 0, 1, 1, 1]
    with pytest.raises(ValueError, match="prompt_len"):
        sft_loss_mask(5, 5)
    with pytest.raises(ValueError, match="prompt_len"):
        sft_loss_mask(5, 0)


MALFORMED = [  # (assistant text, mode_chosen, answer, finished)
    ("17<|im_end|>", None, None, True),  # no think block at all
    ("<think>\n3+5=8 and then", "think", None, False),  # unterminated, truncated
    ("<think>\n3+5=8<|im_end|>", "think", None, True),  # never closed, turn ended
    ("<think>\n\n</think>\n\n8", "no_think", "8", False),  # no end of turn
    ("<think>\n\n</think>\n\n<|im_end|>", "no_think", "", True),  # empty answer
    ("<think>\n\n</think>8<|im_end|>", "no_think", "8", True),  # missing blank line
    ("<think>\n3+5=8</think>\n\n8<|im_end|>", "think", "8", True),  # no newline before </think>
    ("<think>\n \n</think>\n\n8<|im_end|>", "think", "8", True),  # whitespace-only reasoning
    ("<think>\n\n\n</think>\n\n8<|im_end|>", "no_think", "8", True),  # extra newline
    ("<think>\n1\n</think>\n\n2</think>\n\n8<|im_end|>", "think", "8", True),  # two closes
    ("<think>\na<think>\n</think>\n\n8<|im_end|>", "think", "8", True),  # nested open
    ("<think>x\n</think>\n\n8<|im_end|>", None, "8", True),  # no newline after <think>
    ("<think>\n\n</think>\n\n8<|im_end|><|im_end|>", "no_think", "8", True),  # stray end
    ("<think>\n\n</think>\n\n <|im_end|>", "no_think", "", True),
]


@pytest.mark.parametrize("text,mode,answer,finished", MALFORMED)
def test_parse_malformed(text, mode, answer, finished):
    got = parse_assistant(text)
    assert not got.well_formed
    assert got.mode_chosen == mode
    assert got.answer == answer
    assert got.finished == finished


def test_parse_truncated_forced_think(tok):
    tpl = ChatTemplate(tok, 1)
    resp = tok.encode("3+5=8\n8+7=")  # forced-thinking rollout cut off by its budget
    got = tpl.parse_response(resp, "think")
    assert got.mode_chosen == "think" and got.answer is None and not got.well_formed
    assert got.reasoning == "3+5=8\n8+7="
    p_auto = tpl.prompt_ids("q?", 0, "auto")
    assert tpl.classify_mode(p_auto, tok.encode("\n\n</think>\n\n5<|im_end|>")) == "no_think"
    assert tpl.classify_mode(p_auto, tok.encode("5<|im_end|>")) is None
    assert tpl.classify_mode(tok.encode("hello"), tok.encode("5")) is None


def test_input_validation(tok):
    tpl = ChatTemplate(tok, 2)
    with pytest.raises(ValueError, match="question.*<think>"):
        tpl.prompt_ids("say <think> now", 0)
    with pytest.raises(ValueError, match="answer"):
        tpl.response_ids("a<|im_end|>b", None)
    with pytest.raises(ValueError, match="answer"):
        tpl.response_ids("   ", None)
    with pytest.raises(ValueError, match="reasoning"):
        tpl.response_ids("5", None, "think")
    with pytest.raises(ValueError, match="no_think"):
        tpl.response_ids("5", "2+3=5", "no_think")
    with pytest.raises(ValueError, match="n_images"):
        tpl.prompt_ids("<image> and <image>?", 1)
    with pytest.raises(ValueError, match="mode"):
        tpl.prompt_ids("q?", 0, "medium")
    with pytest.raises(ValueError, match="tokens_per_image"):
        ChatTemplate(tok, 0)


def test_resolve_mode():
    assert resolve_mode("long") == "think" and resolve_mode("short") == "no_think"
    assert resolve_mode("auto") == "auto" and resolve_mode("no_think") == "no_think"
    with pytest.raises(ValueError, match="thinking_mode"):
        resolve_mode("Long")


def test_builtin_tokenizer_vocab():
    tok = BuiltinTokenizer()
    assert 64 <= tok.vocab_size <= 200
    assert tok.pad_id not in (tok.eos_id, tok.im_end_id)
    assert tok.encode("\n\n") != tok.encode("\n") * 2  # one token, as in Qwen's vocabulary
    assert tok.encode("15+27") == [tok.token_to_id(c) for c in "15+27"]  # digits stay single
    assert len(tok.encode("<|im_start|>assistant\n")) == 3
    with pytest.raises(ValueError, match="character 'é' at position 2"):
        tok.encode("ab\u00e9")
    with pytest.raises(ValueError, match="ids\\[1\\]"):
        tok.decode([1, tok.vocab_size])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["<think>", "</think>", "<|im_end|>", "<image>", "\n", "\n\n",
                                 "sum", "digits", "a", "7", " ", "<", "|", "user", "<think"]),
                max_size=30).map("".join) | st.text(alphabet=st.characters(
                    min_codepoint=32, max_codepoint=126), max_size=60))
def test_builtin_decode_encode_lossless(s):
    tok = BuiltinTokenizer()
    assert tok.decode(tok.encode(s)) == s


def test_hf_tokenizer_local_only(tmp_path, hf_dir):
    with pytest.raises(FileNotFoundError, match="not an existing local directory"):
        HFTokenizer(tmp_path / "missing")
    no_img = _build_hf_dir(tmp_path / "noimg", with_image=False)
    with pytest.raises(ValueError, match="image_token '<image>'.*add_image_token"):
        HFTokenizer(no_img)
    tok = HFTokenizer(no_img, add_image_token=True)
    assert tok.encode("<image>") == [tok.image_token_id]
    assert tok.vocab_size == HFTokenizer(hf_dir).vocab_size
    tpl = ChatTemplate(tok, 2)
    assert tpl.prompt_ids("q?", 1).count(tok.image_token_id) == 2


def test_copy_tokenizer_files_takes_tokenizer_and_processor_files_and_code_only_when_asked(tmp_path):
    from r4b.data.tokenizer import copy_tokenizer_files

    src, a, b = tmp_path / "src", tmp_path / "a", tmp_path / "b"
    for d in (src, a, b):
        d.mkdir()
    names = ["tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
             "added_tokens.json", "special_tokens_map.json", "chat_template.jinja",
             "preprocessor_config.json", "model.safetensors", "config.json", "modeling_r.py"]
    for n in names:
        (src / n).write_text(n)
    (src / "tokenizer_dir").mkdir()  # a directory is never copied
    want = sorted(set(names) - {"model.safetensors", "config.json", "modeling_r.py"})
    assert copy_tokenizer_files(src, a) == want
    assert sorted(p.name for p in a.iterdir()) == want
    assert (a / "vocab.json").read_text() == "vocab.json"
    assert copy_tokenizer_files(src, b, with_code=True) == sorted(want + ["modeling_r.py"])
