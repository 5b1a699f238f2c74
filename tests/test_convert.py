"""ntk_from_prefix, compress_context and the exact prefixes they approximate, on tiny random models."""

import pytest
import torch
from peft import PeftModel, PrefixTuningConfig, get_peft_model
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

from ntk_attention import adapter_config, adapter_states, prefix_to_ntk
from ntk_attention.convert import compress_context, context_prefix, ntk_from_prefix, prefix_from_peft, prefix_tensors
from ntk_attention.tuners import NTKConfig, PrefixConfig, get_ntk_model

VOCAB = 64


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(config).eval()


class CharTokenizer:
    """Enough of a tokenizer for compress_context: characters to ids."""

    def __call__(self, text, return_tensors=None):
        return {"input_ids": torch.tensor([[ord(c) % VOCAB for c in text]])}


def randomised_prefix_model(base, m: int = 6, std: float = 1.0, **fields):
    model = get_ntk_model(base, PrefixConfig(num_virtual_tokens=m, **fields))
    with torch.no_grad():
        for layer in adapter_states(model):
            layer.prefix_k.normal_(0, std)
            layer.prefix_v.normal_(0, std)
    return model.eval()


def relative_gap(a, b, reference):
    return ((a - b).norm() / (reference - b).norm()).item()


def test_peft_prefix_becomes_an_exact_prefix_adapter():
    base = tiny_llama()
    peft_model = get_peft_model(base, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5))
    with torch.no_grad():
        for p in peft_model.prompt_encoder.parameters():
            p.normal_(0, 1.0)
    peft_model.eval()
    ids = torch.randint(0, VOCAB, (2, 9))
    ours = prefix_from_peft(peft_model)
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, peft_model(input_ids=ids).logits, atol=1e-5, rtol=1e-4)
        # and its NTK conversion goes through the same rotated keys
        ntk = ntk_from_prefix(peft_model, feature_map="random", num_features=4096)
        gap = relative_gap(ntk(input_ids=ids).logits, peft_model(input_ids=ids).logits,
                           ours.unload()(input_ids=ids).logits)
    assert gap < 0.5


def test_ntk_from_prefix_is_the_closed_form_per_layer_and_head():
    prefix_model = randomised_prefix_model(tiny_llama())
    ntk = ntk_from_prefix(prefix_model, feature_map="elu")
    assert adapter_config(ntk).virtual_prefix_length == 6
    for (k, v), layer in zip(prefix_tensors(prefix_model), adapter_states(ntk)):
        z, kvec = layer.ntk_state()
        z_ref, k_ref = prefix_to_ntk(k.repeat_interleave(2, 0), v.repeat_interleave(2, 0), feature_map="elu", scale=8**-0.5)
        torch.testing.assert_close(z, z_ref)
        torch.testing.assert_close(kvec, k_ref)
    # the prefix model itself is untouched and still runs
    assert isinstance(adapter_config(prefix_model), PrefixConfig)
    prefix_model(input_ids=torch.randint(0, VOCAB, (1, 4)))


def test_random_features_approximate_the_prefix_model_and_improve_with_r():
    prefix_model = randomised_prefix_model(tiny_llama(), m=32, std=0.5)
    ids = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        exact = prefix_model(input_ids=ids).logits
        with prefix_model.disable_adapter():
            no_prefix = prefix_model(input_ids=ids).logits
        gaps = [relative_gap(ntk_from_prefix(prefix_model, feature_map="random", num_features=r)(input_ids=ids).logits,
                             exact, no_prefix) for r in (16, 4096)]
    assert gaps[1] < gaps[0] and gaps[1] < 0.3


def test_taylor_conversion_stores_a_signed_k_and_is_near_exact_for_small_logits():
    prefix_model = randomised_prefix_model(tiny_llama(), m=8, std=1.0)
    ids = torch.randint(0, VOCAB, (2, 12))
    ntk = ntk_from_prefix(prefix_model, feature_map="taylor", degree=2)
    assert adapter_config(ntk).k_parametrization == "signed"
    for (k, v), layer in zip(prefix_tensors(prefix_model), adapter_states(ntk)):
        z, kvec = layer.ntk_state()
        z_ref, k_ref = prefix_to_ntk(k.repeat_interleave(2, 0), v.repeat_interleave(2, 0), feature_map="taylor", scale=8**-0.5)
        assert (k_ref < 0).any()  # what "nonneg" could not store
        torch.testing.assert_close(z, z_ref)
        torch.testing.assert_close(kvec, k_ref)
    with torch.no_grad():
        exact = prefix_model(input_ids=ids).logits
        with prefix_model.disable_adapter():
            no_prefix = prefix_model(input_ids=ids).logits
        taylor_gap = relative_gap(ntk(input_ids=ids).logits, exact, no_prefix)
        elu_gap = relative_gap(ntk_from_prefix(prefix_model, feature_map="elu")(input_ids=ids).logits, exact, no_prefix)
    # the tiny model's logits q.k are small, where 1 + s + s^2/2 is close to e^s; ELU+1 is not
    assert taylor_gap < 0.02 and taylor_gap < elu_gap / 10


def test_signed_k_round_trips_save_and_load(tmp_path):
    ntk = ntk_from_prefix(randomised_prefix_model(tiny_llama()), feature_map="taylor")
    ids = torch.randint(0, VOCAB, (1, 7))
    ntk.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    assert adapter_config(loaded).k_parametrization == "signed"
    for a, b in zip(adapter_states(ntk), adapter_states(loaded)):
        assert (b.ntk_state()[1] < 0).any()
        torch.testing.assert_close(a.ntk_state(), b.ntk_state(), rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, ntk(input_ids=ids).logits, rtol=0, atol=0)


def test_trained_heads_come_along():
    torch.manual_seed(0)
    base = BertForSequenceClassification(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=4, intermediate_size=64, num_labels=2)).eval()
    prefix_model = randomised_prefix_model(base, task_type="SEQ_CLS")
    with torch.no_grad():
        prefix_model.base_model.classifier.weight.add_(1.0)
    ntk = ntk_from_prefix(prefix_model, feature_map="random", num_features=64)
    torch.testing.assert_close(ntk.base_model.classifier.weight, prefix_model.base_model.classifier.weight)
    assert adapter_config(ntk).task_type == "SEQ_CLS"


def test_context_prefix_is_exactly_the_text_in_front():
    model = tiny_llama()
    tok = CharTokenizer()
    text, question = "a long text about many things", "what?"
    q_ids = tok(question)["input_ids"]
    with torch.no_grad():
        full = model(input_ids=torch.cat([tok(text)["input_ids"], q_ids], 1)).logits[:, -q_ids.shape[1]:]
        with_prefix = context_prefix(model, tok, text)(input_ids=q_ids).logits
        alone = model(input_ids=q_ids).logits
    torch.testing.assert_close(with_prefix, full, atol=1e-5, rtol=1e-4)
    assert (alone - full).abs().max() > 1e-2  # the text matters, so the check above means something


def test_compress_context_keeps_a_fixed_size_state():
    model = tiny_llama()
    tok = CharTokenizer()
    short, long = compress_context(model, tok, "abc", feature_map="elu"), compress_context(model, tok, "abc" * 50, feature_map="elu")
    for a, b in zip(adapter_states(short), adapter_states(long)):
        assert a.z.shape == b.z.shape == (4, 8, 8) and a.k.shape == (4, 8)
    assert adapter_config(long).virtual_prefix_length == 150
    q_ids = tok("what?")["input_ids"]
    text = "a long text about many things"
    with torch.no_grad():
        full = model(input_ids=torch.cat([tok(text)["input_ids"], q_ids], 1)).logits[:, -q_ids.shape[1]:]
        alone = model(input_ids=q_ids).logits
        compressed = compress_context(model, tok, text, feature_map="random", num_features=4096)(input_ids=q_ids).logits
    assert relative_gap(compressed, full, alone) < 0.5
    # the original model has no adapter
    assert not any("ntk_adapter" in n for n, _ in model.named_modules())


def test_per_kv_head_conversions_keep_one_state_per_kv_head_and_the_same_outputs():
    model, tok = tiny_llama(), CharTokenizer()
    ids = torch.randint(0, VOCAB, (2, 7))
    prefix_model = randomised_prefix_model(tiny_llama())
    for convert in (lambda **o: compress_context(model, tok, "some context text", feature_map="random", num_features=64, **o),
                    lambda **o: ntk_from_prefix(prefix_model, feature_map="elu", **o)):
        per_query, per_kv = convert(), convert(per_kv_head=True)
        assert all(layer.z.shape[0] == 2 and layer.k.shape == (2, layer.z.shape[1]) for layer in adapter_states(per_kv))
        with torch.no_grad():
            torch.testing.assert_close(per_kv(input_ids=ids).logits, per_query(input_ids=ids).logits, rtol=1e-5, atol=1e-6)


def test_conversion_errors():
    model = tiny_llama()
    with pytest.raises(TypeError, match="prefix"):
        ntk_from_prefix(model)
    with pytest.raises(TypeError, match="got a NTKConfig adapter"):
        ntk_from_prefix(get_ntk_model(tiny_llama(), NTKConfig()))
    with pytest.raises(ValueError, match="k_parametrization='signed'"):
        ntk_from_prefix(randomised_prefix_model(tiny_llama()), feature_map="taylor", k_parametrization="nonneg")
    with pytest.raises(ValueError, match="can be <= 0"):
        ntk_from_prefix(randomised_prefix_model(tiny_llama()), feature_map="taylor", degree=1)
    with pytest.raises(ValueError, match="unknown feature_map 'softmax'"):
        ntk_from_prefix(randomised_prefix_model(tiny_llama()), feature_map="softmax")
    with pytest.raises(ValueError, match="non-empty string"):
        compress_context(model, CharTokenizer(), "")
