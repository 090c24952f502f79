"""The preallocated KV cache gives the logits of the model's own cache, grows past its capacity, drops rows."""

import torch

from text_env.kv_cache import PreallocatedLayer, preallocated_cache


def decode(model, ids, cache, select=None):
    """Prefill ids[:, :3], then feed one token at a time; return the last-position logits of every step."""
    kw = {} if cache is None else {"cache": cache}
    out = model(input_ids=ids[:, :3], use_cache=True, **kw)
    cache, logits = out.cache, [out.logits[:, -1]]
    for t in range(3, ids.shape[1]):
        if select is not None and t == 5:
            cache.batch_select_indices(select)
            ids = ids[select]
            logits = [x[select] for x in logits]
        out = model(input_ids=ids[:, t : t + 1], cache=cache, use_cache=True)
        cache = out.cache
        logits.append(out.logits[:, -1])
    return torch.stack(logits, 1)


def test_preallocated_cache_matches_the_models_own_and_grows(core):
    model = core.reference
    ids = torch.randint(3, model.config.vocab_size, (4, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        own = decode(model, ids, None)
        cache = preallocated_cache(model, capacity=4)  # smaller than 9 positions: must grow
        ours = decode(model, ids, cache)
        assert all(isinstance(layer, PreallocatedLayer) for layer in cache.layers)
        assert cache.get_seq_length() == 9 and cache.layers[0]._keys.shape[2] >= 9
        torch.testing.assert_close(ours, own, atol=1e-5, rtol=0)
        rows = torch.tensor([2, 0])
        cache = preallocated_cache(model, capacity=16)
        dropped = decode(model, ids, cache, select=rows)  # rows dropped at 5 filled positions of 16
        torch.testing.assert_close(dropped, own[rows], atol=1e-5, rtol=0)
        assert cache.layers[0]._keys.shape[:3] == (2, model.config.n_head, 16)  # capacity kept: no regrowth
