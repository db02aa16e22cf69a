"""Packed rows: each example's logits equal the same example run alone (block-diagonal attention from
restarting position_ids, no attention mask), and the loss counts assistant tokens only."""
import numpy as np
import pytest
import torch

from rayft.data.pack import collate
from rayft.train.loss import count_loss_tokens, sum_token_loss
from tests.pack_helpers import pack_examples


@pytest.fixture(scope="module")
def examples(tiny_tokenizer):
    texts = ["How do I reset my password? Open settings.", "Opening hours are nine to five.",
             "Refunds take five business days to arrive on your card."]
    ids = [tiny_tokenizer(t)["input_ids"] for t in texts]
    masks = [[0] * (len(x) // 2) + [1] * (len(x) - len(x) // 2) for x in ids]
    return ids, masks


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_logits_equal_each_example_alone(tiny_model_dir, tiny_tokenizer, examples, attn):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attn).eval()
    ids, masks = examples
    block = sum(len(x) for x in ids) + 5  # room for all three plus a pad tail
    packed = pack_examples(ids, masks, block, tiny_tokenizer.pad_token_id)
    assert len(packed["input_ids"]) == 1 and packed["num_examples"][0] == 3
    batch = collate({k: packed[k] for k in ("input_ids", "labels", "position_ids")}, tiny_tokenizer.pad_token_id, packed=True)
    assert "attention_mask" not in batch
    with torch.no_grad():
        # use_cache=False as in training: transformers only derives the packed mask when no KV cache is built.
        packed_logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        # Find each example in the block by its restarting positions.
        starts = np.flatnonzero(batch["position_ids"][0].numpy() == 0)
        for example in ids:
            alone = model(input_ids=torch.tensor([example])).logits[0]
            matches = [s for s in starts if batch["input_ids"][0, s:s + len(example)].tolist() == example]
            assert matches, "example not found in the packed block"
            s = matches[0]
            torch.testing.assert_close(packed_logits[s:s + len(example)], alone, atol=1e-5, rtol=1e-4)


def test_loss_is_normalised_by_unmasked_tokens_of_the_window():
    torch.manual_seed(0)
    logits = torch.randn(4, 6, 11)
    labels = torch.randint(0, 11, (4, 6))
    labels[labels % 3 == 0] = -100  # prompt tokens
    # One window split into micro batches of different sizes gives the mean over all labelled tokens.
    tokens = count_loss_tokens(labels.numpy())
    split = sum(float(sum_token_loss(logits[a:b], labels[a:b])) for a, b in ((0, 1), (1, 4))) / tokens
    flat = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert split == pytest.approx(float(flat), rel=1e-6)
    assert tokens == int((labels[:, 1:] != -100).sum())
