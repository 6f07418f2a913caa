"""Generation and scoring: what ppo.py, evaluate.py, chat.py and bench/ share.

    batch = rollout.generate_rollout(actor, queries, query_mask, config, batch_size=8)   # sample answers
    reward_fn = rollout.reward_function(reward_model, tokenizer, reward_tokenizer)     # decided once, at setup
    scored = rollout.score_rollout(batch, actor, reference, critic, reward_fn, temperature=0.7, batch_size=8)

Every function takes explicit tensors and numbers (no argument objects). Conventions:
- prompts are left-padded (`left_pad`), responses right-padded to a fixed length; the sequence a model reads is
  `[queries | responses]`, and position ids count real tokens only, so padding changes nothing;
- the log-prob of response token t is read from the logits at position context - 1 + t (position t predicts t+1),
  under the sampling temperature, over the full vocabulary (top-k / top-p only shape what is sampled);
- a value is read at every response position (the state before each token), a reward score at the last real token.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, fields
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from simple_rlhf.errors import UserError


# ----------------------------------------------------------------------------------------------------------------
# Batches of token ids
# ----------------------------------------------------------------------------------------------------------------
def left_pad(sequences: list[list[int]], pad_token_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.tensor([[pad_token_id] * (width - len(s)) + s for s in sequences], device=device)
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in sequences], device=device)
    return ids, mask


def chunks(n: int, size: int) -> list[slice]:
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def shard_of_shuffle(rows: list, batch_size: int, position: int, seed: int, num_processes: int,
                     process_index: int) -> list:
    """This process's `batch_size` rows of the position-th global batch: a pure function of the position (so a
    resumed run sees the same data), walking through a fresh seeded shuffle of the rows on each pass, with the
    processes taking consecutive, disjoint slices."""
    per_pass = len(rows) // (batch_size * num_processes)
    epoch, index = divmod(position, per_pass)
    order = np.random.RandomState(seed + epoch).permutation(len(rows))
    start = (index * num_processes + process_index) * batch_size
    return [rows[int(i)] for i in order[start : start + batch_size]]


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Positions that count real tokens only, so a left-padded sequence is seen exactly as the unpadded one."""
    return (mask.long().cumsum(dim=1) - 1).clamp(min=0)


def truncate_after_stop(responses: torch.Tensor, stop_token_id: int, pad_token_id: int):
    """Replace every token after the first stop token with padding; return (responses, mask, has_stop).

    The mask comes from the stop position, not from `!= pad`, since pad and EOS are often the same token.
    """
    length = responses.shape[1]
    is_stop = responses == stop_token_id
    has_stop = is_stop.any(dim=1)
    first_stop = torch.where(has_stop, is_stop.int().argmax(dim=1), torch.full_like(has_stop, length, dtype=torch.long))
    positions = torch.arange(length, device=responses.device).unsqueeze(0)
    mask = positions <= first_stop.unsqueeze(1)  # the stop token itself is part of the response
    return torch.where(mask, responses, torch.full_like(responses, pad_token_id)), mask.long(), has_stop


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last 1 in each row of a 0/1 mask (the token whose score the reward model gives)."""
    positions = torch.arange(mask.shape[1], device=mask.device).unsqueeze(0)
    return (positions * mask).argmax(dim=1)


@dataclass
class Rollout:
    """Sampled answers: left-padded prompts, right-padded responses cut after the stop token."""

    queries: torch.Tensor  # (batch, context) prompt ids, left-padded
    query_mask: torch.Tensor
    responses: torch.Tensor  # (batch, response_length) ids, padding after the stop token
    response_mask: torch.Tensor  # 1 up to and including the stop token
    has_stop: torch.Tensor  # (batch,) bool: the response produced the stop token
    logprobs: torch.Tensor | None = None  # (batch, response_length) from generate()'s logits, if it recorded them

    @property
    def context(self) -> int:
        return self.queries.shape[1]

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.queries, self.responses], 1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.query_mask, self.response_mask], 1)

    def __len__(self) -> int:
        return len(self.queries)

    def __getitem__(self, index) -> Rollout:
        return Rollout(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[index]
                          for f in fields(self)})


# ----------------------------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------------------------
GENERATION_BACKENDS = ("dynamic", "static")


def sampling_config(max_new_tokens: int, temperature: float, top_k: int, top_p: float, stop_token_id: int,
                    pad_token_id: int, greedy: bool = False, repetition_penalty: float = 1.0,
                    backend: str = "dynamic"):
    """A GenerationConfig that samples exactly what the arguments say.

    generate() fills every option left None from the model's generation_config (hub checkpoints ship top_k,
    repetition_penalty, ...), then from global defaults (top_k 50): set every one that reshapes the sampling
    distribution, so top_k 0 means all tokens and the training log-probs match what was sampled.
    backend: the KV cache: "dynamic" (transformers' default: grows by a copy per token) or "static" (preallocated
    for prompt + max_new_tokens; no compilation: transformers would compile the decoding step on GPUs by itself).
    """
    from transformers import GenerationConfig

    if backend not in GENERATION_BACKENDS:
        raise UserError(f"--generation_backend {backend}: use one of {', '.join(GENERATION_BACKENDS)}")
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=not greedy,
                              temperature=None if greedy else temperature, top_k=None if greedy else top_k,
                              top_p=None if greedy else top_p, eos_token_id=stop_token_id, pad_token_id=pad_token_id,
                              use_cache=True, min_length=0, repetition_penalty=repetition_penalty,
                              no_repeat_ngram_size=0, typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0)
    if backend == "static":
        config.cache_implementation, config.disable_compile = "static", True
    return config


class SampledTokenLogprobs:
    """A logits processor that records, while generate() samples, the log-prob of each sampled token under the
    full distribution at `temperature`: the same quantity a fresh forward pass gives (logprobs_from_logits), one
    forward pass fewer. Custom processors run before the sampling warpers (temperature, top-k, top-p), so the
    scores seen here are the model's raw logits; the token sampled from step t's scores is the last of input_ids
    at step t + 1, so each step keeps only one (batch, vocab) row set until the next."""

    def __init__(self, temperature: float):
        self.temperature, self.steps, self.pending = temperature, [], None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.take(input_ids[:, -1])
        self.pending = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return scores

    def take(self, tokens: torch.Tensor) -> None:
        if self.pending is not None:
            self.steps.append(self.pending.gather(1, tokens[:, None]).squeeze(1))
        self.pending = None

    def result(self, last_tokens: torch.Tensor) -> torch.Tensor:
        self.take(last_tokens)
        return torch.stack(self.steps, 1)


def mergeable_lora_layers(model) -> list:
    """The LoRA layers whose adapters can be folded exactly into a plain float weight (not DoRA, no LoRA bias, not
    quantized, not a DeepSpeed ZeRO-3 parameter whose hooks may swap its data back during generation)."""
    from peft.tuners.lora import LoraLayer

    layers = []
    for module in model.modules():
        if not isinstance(module, LoraLayer) or module.merged or module.disable_adapters:
            continue
        base = module.get_base_layer()
        names = [n for n in module.active_adapters if n in module.lora_A]
        if (names and type(base) is nn.Linear and base.weight.dtype.is_floating_point
                and not hasattr(base.weight, "ds_id")
                and not any(module.use_dora.get(n) or module.lora_bias.get(n) for n in names)):
            layers.append((module, base, names))
    return layers


@contextlib.contextmanager
def merged_lora(model):
    """Run `model` with its LoRA deltas folded into the base weights (one matmul per layer instead of three).

    Unlike PEFT's merge_adapter/unmerge_adapter, which add and subtract BA in place (a rounding drift per
    iteration, large in bf16), the merged weight W + BA is a new tensor swapped in, and W is swapped back bit for
    bit on exit: the reference (adapter off) never moves. A no-op for models without (mergeable) LoRA layers.
    """
    swapped = []
    try:
        with torch.no_grad():
            for module, base, names in mergeable_lora_layers(model):
                original = base.weight.data
                delta = sum(module.get_delta_weight(name) for name in names)
                base.weight.data = original + delta.to(original.dtype)
                module.merged_adapters.extend(names)  # PEFT's forward then calls the base layer alone
                swapped.append((module, base, original, names))
        yield
    finally:
        for module, base, original, names in reversed(swapped):
            base.weight.data = original
            for name in names:
                module.merged_adapters.remove(name)


@contextlib.contextmanager
def bare_generation_config(model):
    """generate() fills every option its generation_config leaves None from the model's own generation_config
    (min_new_tokens, suppress_tokens, bad_words_ids, forced_eos_token_id, min_p, ...: a checkpoint may ship any of
    them), and they act before the log-prob recorder: sampling would then differ from the distribution whose
    log-probs PPO trains on. While generating, the model's (and a PEFT wrapper's base model's) generation_config is a
    bare one, so only what sampling_config sets (and transformers' neutral defaults) applies."""
    from transformers import GenerationConfig

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    targets = [m for m in {id(m): m for m in (model, inner)}.values() if hasattr(m, "generation_config")]
    saved = [m.generation_config for m in targets]
    for m in targets:
        m.generation_config = GenerationConfig()
    try:
        yield
    finally:
        for m, config in zip(targets, saved):
            m.generation_config = config


@torch.no_grad()
def generate_responses(actor, queries: torch.Tensor, query_mask: torch.Tensor, config, batch_size: int,
                       logprobs_temperature: float | None = None):
    """Up to config.max_new_tokens sampled ids per prompt, right-padded to that length, in chunks of batch_size.

    Returns (responses, logprobs): with logprobs_temperature, logprobs are the sampled tokens' log-probs at that
    temperature (SampledTokenLogprobs), padded with 0; without, None.
    """
    length, pad_token_id = config.max_new_tokens, config.pad_token_id
    responses, logprobs = [], []
    for part in chunks(len(queries), batch_size):
        recorder = None if logprobs_temperature is None else SampledTokenLogprobs(logprobs_temperature)
        with bare_generation_config(actor):
            output = actor.generate(input_ids=queries[part], attention_mask=query_mask[part], generation_config=config,
                                    logits_processor=None if recorder is None else [recorder])
        new = output[:, queries.shape[1]:]
        responses.append(nn.functional.pad(new, (0, length - new.shape[1]), value=pad_token_id))
        if recorder is not None:
            logprobs.append(nn.functional.pad(recorder.result(new[:, -1]), (0, length - new.shape[1]), value=0.0))
    return torch.cat(responses), (torch.cat(logprobs) if logprobs else None)


def generate_rollout(actor, queries: torch.Tensor, query_mask: torch.Tensor, config, batch_size: int,
                     logprobs_temperature: float | None = None, merge_lora: bool = True) -> Rollout:
    """Sample answers to left-padded prompts and cut them after config.eos_token_id (the stop token).

    logprobs_temperature: also record the sampled tokens' log-probs (Rollout.logprobs; use it only where generate()
    computes the logits as a fresh forward pass would: float32 weights, no autocast). merge_lora: sample with the
    LoRA weights merged (merged_lora).
    """
    with merged_lora(actor) if merge_lora else contextlib.nullcontext():
        raw, logprobs = generate_responses(actor, queries, query_mask, config, batch_size, logprobs_temperature)
    responses, response_mask, has_stop = truncate_after_stop(raw, config.eos_token_id, config.pad_token_id)
    return Rollout(queries, query_mask, responses, response_mask, has_stop,
                   None if logprobs is None else logprobs * response_mask)


# ----------------------------------------------------------------------------------------------------------------
# Forward passes: log-probs, values, scores
# ----------------------------------------------------------------------------------------------------------------
def keeps_logits(model) -> bool:
    """Whether the causal LM's forward takes `logits_to_keep` (computes the vocabulary head on the last positions
    only): transformers' models do; with OPT's 50k vocabulary the head is a third of a 125M model's forward."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def policy_logits(actor, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep: int = 0) -> torch.Tensor:
    """The actor's logits at every position, or (keep > 0) at the last `keep` positions only."""
    extra = {"logits_to_keep": keep} if keep and keeps_logits(actor) else {}
    logits = actor(input_ids=input_ids, attention_mask=attention_mask,
                   position_ids=position_ids_from_mask(attention_mask), use_cache=False, **extra).logits
    return logits[:, -keep:] if keep else logits


def _by_rows(function, logits: torch.Tensor, *others, rows: int = 1) -> torch.Tensor:
    """function(logits[part], *others[part]) over chunks of `rows` sequences, concatenated. Each chunk is upcast to
    float32 inside `function`, so no float32 copy of the whole (batch, length, vocab) tensor is ever made; under
    autograd the chunks are recomputed in the backward pass (checkpointing) rather than kept."""
    from torch.utils.checkpoint import checkpoint

    grad = torch.is_grad_enabled() and logits.requires_grad
    out = []
    for part in chunks(len(logits), rows):
        args = (logits[part], *(t[part] for t in others))
        out.append(checkpoint(function, *args, use_reentrant=False) if grad else function(*args))
    return torch.cat(out)


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """Log-probs of `tokens` under logits scaled by the sampling temperature (as generate() sampled them)."""
    from trl.trainer.utils import selective_log_softmax

    return _by_rows(lambda chunk, index: selective_log_softmax(chunk.float() / temperature, index), logits, tokens)


def entropy_from_logits(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Entropy of the sampling distribution (logits / temperature) at each position, in chunks as above."""
    from trl.trainer.utils import entropy_from_logits as entropy

    return _by_rows(lambda chunk: entropy(chunk.float() / temperature), logits)


def backbone_and_head(sequence_classifier):
    """The transformer and the score head of a sequence classifier (through a PEFT wrapper)."""
    from peft import PeftModel

    model = sequence_classifier.get_base_model() if isinstance(sequence_classifier, PeftModel) else sequence_classifier
    head = getattr(model, "score", None)
    if head is None:
        raise UserError(f"{type(model).__name__} has no `score` head; use a model whose sequence classifier "
                               "has one (OPT, Llama, Qwen, GPT-2, ...)")
    return getattr(model, model.base_model_prefix), head


def head_dtype(head: nn.Module) -> torch.dtype:
    """The dtype of the head that will run: under ZeRO-3 with bf16, PEFT's trainable copy of the score head (the
    critic's value head) stays float32 while the backbone and the original head (the reward model's) are bf16."""
    from peft.utils.other import ModulesToSaveWrapper

    if isinstance(head, ModulesToSaveWrapper) and not head.disable_adapters and head.active_adapters:
        head = head.modules_to_save[head.active_adapters[0]]
    return next(head.parameters()).dtype


def per_token_scores(sequence_classifier, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The score head applied at every token: the critic's values, or the reward model's score at a chosen index."""
    backbone, head = backbone_and_head(sequence_classifier)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask,
                      position_ids=position_ids_from_mask(attention_mask), use_cache=False).last_hidden_state
    return head(hidden.to(head_dtype(head))).squeeze(-1).float()


def score_at_last_token(reward_model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """A sequence classifier's score, read at the token it read in training (reward.py: prompt + answer + EOS):
    the last one that is not its pad id. With pad != eos that is the EOS of a stopped response; with pad == eos
    (GPT-2-like tokenizers, where models.load_tokenizer sets pad = eos) it is the last answer token before the EOS."""
    per_token = per_token_scores(reward_model, input_ids, attention_mask)
    pad_token_id = reward_model.config.pad_token_id
    read = attention_mask if pad_token_id is None else attention_mask * (input_ids != pad_token_id)
    return per_token.gather(1, last_token_index(read).unsqueeze(1)).squeeze(1)


@torch.no_grad()
def response_logprobs(actor, batch: Rollout, temperature: float) -> torch.Tensor:
    """(batch, response_length) log-probs of the sampled response tokens under `actor`, one forward pass; the
    vocabulary head runs on the response positions only (position t predicts token t + 1)."""
    logits = policy_logits(actor, batch.input_ids, batch.attention_mask, keep=batch.responses.shape[1] + 1)
    return logprobs_from_logits(logits[:, :-1], batch.responses, temperature)


@torch.no_grad()
def response_values(critic, batch: Rollout) -> torch.Tensor:
    """(batch, response_length) values of the states before each response token: positions context-1 .. end-1."""
    return per_token_scores(critic, batch.input_ids, batch.attention_mask)[:, batch.context - 1 : -1]


# ----------------------------------------------------------------------------------------------------------------
# Reward: one scoring function, decided at setup
# ----------------------------------------------------------------------------------------------------------------
def same_tokenizer(a, b) -> bool:
    return a.get_vocab() == b.get_vocab() and a.eos_token_id == b.eos_token_id


def for_reward_model(batch: Rollout, stop_token_id: int | None, eos_token_id: int) -> torch.Tensor:
    """The responses as reward.py trained on answers: ending in EOS. A custom stop token (ppo.py --stop_token) ends
    a response in its place, so it is read as the EOS it stands for."""
    if stop_token_id is None or stop_token_id == eos_token_id:
        return batch.responses
    return torch.where((batch.responses == stop_token_id) & batch.response_mask.bool(), eos_token_id, batch.responses)


def retokenize(batch: Rollout, tokenizer, reward_tokenizer, stop_token_id: int | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt + response as text, re-tokenized for the reward model (+ its EOS where the response stopped), as
    reward.py trained it on prompt + answer + EOS.

    Prompt and response are decoded together: decoded apart, SentencePiece (Metaspace) tokenizers drop the space
    that the response's first piece carries ("Assistant:Paris." for "Assistant: Paris."). A custom stop token is
    left out of the text, the EOS stands for it."""
    sequences = []
    for query, query_mask, response, mask, stopped in zip(batch.queries, batch.query_mask, batch.responses,
                                                          batch.response_mask, batch.has_stop):
        answer = response[mask.bool()]
        if stopped and stop_token_id is not None and stop_token_id != tokenizer.eos_token_id:
            answer = answer[:-1]  # the stop token: the EOS appended below stands for it
        text = tokenizer.decode(torch.cat([query[query_mask.bool()], answer]), skip_special_tokens=True)
        sequences.append(reward_tokenizer(text)["input_ids"] + ([reward_tokenizer.eos_token_id] if stopped else []))
    return left_pad(sequences, reward_tokenizer.pad_token_id, batch.queries.device)


def reward_function(reward_model, tokenizer, reward_tokenizer, adapter_off: bool = False,
                    stop_token_id: int | None = None) -> Callable[[Rollout], torch.Tensor]:
    """The reward model's score of each sequence of a rollout, as a function of the rollout.

    Decided here, once: with the policy's tokenizer the ids are read as they are; with another tokenizer the text
    is decoded and re-tokenized. Both read prompt + answer + EOS, as reward.py trained: a custom stop token
    (stop_token_id, when it is not the EOS) counts as the EOS. adapter_off: the reward model is a PEFT model (the
    critic) whose adapter must be switched off to give the reward model's own score.
    """
    retokenized = not same_tokenizer(tokenizer, reward_tokenizer)

    @torch.no_grad()
    def scores(batch: Rollout) -> torch.Tensor:
        if retokenized:
            ids, mask = retokenize(batch, tokenizer, reward_tokenizer, stop_token_id)
        else:
            responses = for_reward_model(batch, stop_token_id, tokenizer.eos_token_id)
            ids, mask = torch.cat([batch.queries, responses], 1), batch.attention_mask
        with reward_model.disable_adapter() if adapter_off else contextlib.nullcontext():
            return score_at_last_token(reward_model, ids, mask)

    return scores


# ----------------------------------------------------------------------------------------------------------------
# Scoring a rollout for PPO
# ----------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def score_rollout(batch: Rollout, actor, reference, critic, reward_fn: Callable[[Rollout], torch.Tensor],
                  temperature: float, batch_size: int, autocast=contextlib.nullcontext) -> dict:
    """Log-probs under actor and reference, the critic's values and the reward, in chunks of batch_size.

    The actor's log-probs are taken from the rollout when generate() recorded them (generate_rollout's
    logprobs_temperature), else from a forward pass. reference None means the actor with its (PEFT) adapter switched
    off. critic None skips the values (estimators without a critic). autocast: a context factory for mixed
    precision (accelerator.autocast).
    Returns a dict of (batch, response_length) tensors logprobs, ref_logprobs, values (or None) and (batch,) scores.
    """
    out = {"logprobs": [], "ref_logprobs": [], "values": [], "scores": []}
    for part in chunks(len(batch), batch_size):
        piece = batch[part]
        with autocast():
            out["logprobs"].append(piece.logprobs if piece.logprobs is not None
                                   else response_logprobs(actor, piece, temperature))
            with actor.disable_adapter() if reference is None else contextlib.nullcontext():
                out["ref_logprobs"].append(response_logprobs(actor if reference is None else reference, piece,
                                                             temperature))
            if critic is not None:
                out["values"].append(response_values(critic, piece))
            if reward_fn is not None:  # None: no reward model (reward functions alone)
                out["scores"].append(reward_fn(piece))
    return {key: torch.cat(value) if value else None for key, value in out.items()}


def stop_token_id(tokenizer, stop_token: str) -> int:
    """ppo.py's --stop_token: 'eos' or a string that is one token of the policy's tokenizer."""
    if stop_token == "eos":
        return tokenizer.eos_token_id
    stop_ids = tokenizer(stop_token, add_special_tokens=False)["input_ids"]
    if len(stop_ids) != 1:
        raise UserError(f"--stop_token {stop_token!r} is {len(stop_ids)} tokens; give one token or eos")
    return stop_ids[0]
