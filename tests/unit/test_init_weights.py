"""init_weights on a meta model equals the model's own init, and keeps tied embeddings tied."""

import pytest
import torch

from trainer.models.flavors import get_model_args
from trainer.models.llama import Transformer
from trainer.weights import init_weights


@pytest.mark.parametrize("name", ["llama3", "smollm"])
def test_meta_init_matches_eager_init(name):
    args = get_model_args(name, "debugmodel")
    with torch.device("meta"):
        model = Transformer(args)
    init_weights(model, seed=3, device=torch.device("cpu"))
    ref = Transformer(args)
    ref.init_weights(seed=3)
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in ref.named_parameters()]
    for (pname, p), (_, r) in zip(model.named_parameters(), ref.named_parameters()):
        assert torch.equal(p, r), pname
    if args.tie_word_embeddings:
        # Module.to_empty re-creates plain parameters per module, which silently unties them.
        assert model.output.weight is model.tok_embeddings.weight
