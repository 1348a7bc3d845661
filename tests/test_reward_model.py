"""The reward-model reward: a transformers sequence-classification folder scored in JAX equals
transformers' scores on the same texts."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jaxft.data.from_config import load_bundled_tokenizer  # noqa: E402
from jaxft.errors import DataError  # noqa: E402
from jaxft.rewards import make_reward  # noqa: E402
from tests.hf_reference import COMMON  # noqa: E402

RECORDS = [{"prompt": [{"role": "user", "content": "What is 2 + 3?"}]}, {"prompt": "Count: one two"}]
COMPLETIONS = [["The answer is 5.", "6"], [" three four", " three three three three"]]


@pytest.fixture(scope="module")
def reward_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("rm")
    tok = load_bundled_tokenizer()
    config = transformers.LlamaConfig(**{**COMMON, "vocab_size": len(tok), "num_labels": 1,
                                         "pad_token_id": tok.pad_token_id})
    torch.manual_seed(0)
    model = transformers.LlamaForSequenceClassification(config).eval()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder, model, tok


def test_rewards_equal_transformers_scores(reward_folder):
    folder, model, tok = reward_folder
    reward = make_reward({"kind": "reward_model", "path": str(folder), "batch_size": 3})
    got = reward(RECORDS, COMPLETIONS)["reward"]
    texts = [tok.apply_chat_template(RECORDS[0]["prompt"] + [{"role": "assistant", "content": c}], tokenize=False)
             for c in COMPLETIONS[0]] + [RECORDS[1]["prompt"] + c for c in COMPLETIONS[1]]
    want = []
    for i, text in enumerate(texts):  # one at a time: no padding on the reference side
        ids = tok(text, add_special_tokens=i >= 2)["input_ids"]  # a raw prompt gets BOS
        with torch.no_grad():
            want.append(float(model(input_ids=torch.tensor([ids])).logits[0, 0]))
    np.testing.assert_allclose(got.reshape(-1), want, atol=1e-4)
    assert got.shape == (2, 2) and len(set(np.round(got.reshape(-1), 4))) == 4


def test_a_causal_lm_folder_is_not_a_reward_model(tmp_path):
    from jaxft.models import create_model, get_preset, save_hf

    tok = load_bundled_tokenizer()
    save_hf(create_model(get_preset("tiny").replace(num_layers=1), seed=0), tmp_path, tokenizer=tok)
    with pytest.raises(DataError, match="no score.weight: a reward model is a .*ForSequenceClassification"):
        make_reward({"kind": "reward_model", "path": str(tmp_path)})
