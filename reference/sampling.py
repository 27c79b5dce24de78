"""Token sampling on device: greedy, temperature, top-k, top-p; one PRNG key per request and position.

The key for a row is fold_in(PRNGKey(seed), position), where position is the index the
sampled token will have in prompt + output. It depends on nothing else, so a request's
tokens do not change with the batch it happens to share a step with.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def _filter(logits: Array, temperature: Array, top_k: Array, top_p: Array) -> Array:
    """Logits [V] scaled by temperature, with tokens outside top-k / top-p set to -inf."""
    V = logits.shape[-1]
    x = logits / jnp.maximum(temperature, 1e-6)  # [V]
    sorted_x = jnp.sort(x)[::-1]  # [V] descending
    k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)
    x = jnp.where(x < sorted_x[k - 1], -jnp.inf, x)  # keep the k largest (and ties)
    # top-p over what top-k kept: the smallest prefix of the sorted tokens whose mass reaches p.
    sorted_x = jnp.where(jnp.arange(V) < k, sorted_x, -jnp.inf)
    probs = jax.nn.softmax(sorted_x)  # [V]
    mass_before = jnp.cumsum(probs) - probs  # [V]
    keep = mass_before < top_p  # the first token is always kept
    threshold = jnp.min(jnp.where(keep, sorted_x, jnp.inf))
    return jnp.where(x < threshold, -jnp.inf, x)


def _key(seed, position):
    return jax.random.fold_in(jax.random.PRNGKey(seed), position)


def _filtered_row(logits, temperature, top_k, top_p, seed, position):
    return jax.random.categorical(_key(seed, position), _filter(logits, temperature, top_k, top_p)).astype(jnp.int32)


def _plain_row(logits, temperature, seed, position):
    # No top-k/top-p: the same draw as _filtered_row (the same key and Gumbel noise over the same scaled
    # logits), without the sort of the vocabulary that the filter needs, the step's largest cost when
    # sampling on CPU (experiments/results/server16/sampling_what_if.txt).
    return jax.random.categorical(_key(seed, position), logits / jnp.maximum(temperature, 1e-6)).astype(jnp.int32)


def sample(logits: Array, temperature: Array, top_k: Array, top_p: Array, seeds: Array,
           positions: Array) -> Array:
    """One token per row. logits [B, V] float32; temperature, top_p [B] float32; top_k [B] int32
    (0 = off); seeds [B] uint32; positions [B] int32 (of the token being sampled) -> tokens [B] int32.

    temperature 0 is greedy (argmax). The vocabulary is sorted (for top-k/top-p) only if some sampled row
    filters; a step where every row is greedy draws nothing.
    """
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [B]
    sampled = temperature > 0  # [B]

    def plain(_):
        return jnp.where(sampled, jax.vmap(_plain_row)(logits, temperature, seeds, positions), greedy)

    def filtered(_):
        drawn = jax.vmap(_filtered_row)(logits, temperature, top_k, top_p, seeds, positions)  # [B]
        return jnp.where(sampled, drawn, greedy)

    filters = jnp.any(sampled & ((top_k > 0) | (top_p < 1)))
    branch = jnp.where(filters, 2, jnp.where(jnp.any(sampled), 1, 0))
    return jax.lax.switch(branch, [lambda _: greedy, plain, filtered], None)
