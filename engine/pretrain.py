"""The embedded default: a tiny Qwen2 and its tokenizer, pretrained offline on transcripts of play.

A real LLM arrives knowing the language of the game and the output format; RL only reshapes what
it already does. Offline, on 2 CPU cores, the project builds that starting point itself:

    1. play the environment at random (uniform over its actions), recording every turn
    2. train a byte-level BPE tokenizer on the texts the model will meet (saved in Hugging Face
       format, so `engine/hf.py` reads it back like any Hub tokenizer)
    3. "pretrain" a tiny Qwen2 with cross-entropy (rwml.train_sft: docs/methods.md eq. 20) on two kinds of transcript:
         play:         [policy prompt ; response <|im_end|> ; next observation]
                       (the layout PaW trains on: the model learns the format, a uniform policy,
                       and a world model of the game inline)
         world model:  [RWML's world-model prompt ; "<think> </think>\\n<next_state> s' </next_state>"]
                       (so RWML and WM SFT start from a model that answers in their format)
    4. save it as a Hugging Face checkpoint, cached by the recipe's hash so it happens once

The result imitates random play: format-perfect, nearly uniform over actions (success near that of
random play), and a world model that is right often but not always. That is the headroom the
methods compete for. It is a stand-in for pretraining, not a language model.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Sequence

import jax
import numpy as np
from filelock import FileLock

import envs
from envs import tau2
import grpo
import model as lm
import rollout
import rwml
from engine import hf

RECIPE_VERSION = 1  # bump when the transcripts or the training change, so stale caches are rebuilt


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    """How the embedded default is made (all of it goes into the cache key)."""

    episodes: int = 3000
    """random-play episodes to record"""
    steps: int = 300
    """cross-entropy steps"""
    batch_size: int = 128
    """play transcripts per step; a world-model step takes a quarter as many (they are ~4x longer)"""
    learning_rate: float = 1e-3
    """AdamW peak learning rate, with linear warmup then cosine decay to 0"""
    warmup_steps: int = 40
    world_model_fraction: float = 0.3
    """share of the steps that train on world-model transcripts (the rest on play)"""
    vocab_size: int = 512
    hidden_size: int = 64
    intermediate_size: int = 192
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    seed: int = 0
    max_length: int | None = None
    """transcripts longer than this many tokens are left out (None: none is); tau2-bench's longest world-model
    transcripts (a product's every variant, twice) would set the padded length of every batch they are in"""
    dynamics: bool = True
    """play transcripts end with the next observation and world-model ones answer with the next state; False: they
    end at the response and answer with the current state (the format and the grid, not what an action does)"""
    following_chars: int | None = None
    """a play transcript's next observation is cut to this many characters (None: whole; a world-model transcript's
    label always is); tau2's compact prompt shows no more of it (tau2.PRESENT_CUT), and whole it padded most play
    batches to 2,048 tokens rather than 1,024"""


def transcripts(game: envs.Game, trajectories: Sequence[rollout.Trajectory], prompts: Sequence[Sequence[str]], tokenizer,
                seed: int, dynamics: bool = True, following_chars: int | None = None
                ) -> tuple[list[tuple[list[int], list[int]]], list[tuple[list[int], list[int]]]]:
    """(context ids, target ids) pairs: every play turn (its next observation cut to following_chars), and a
    world-model example of every valid triplet (its prompt form, RWML's or WM SFT's direct one, drawn at random,
    its label whole). Without dynamics, a play turn ends at the response and a world-model example answers with the
    triplet's current state: the model learns the format and the grid, and that nothing follows from an action.
    """
    eos = [tokenizer.eos_token_id]
    encode = functools.partial(tokenizer.encode, add_special_tokens=False)
    play = []
    for trajectory, turn_prompts in zip(trajectories, prompts):
        for turn, prompt in zip(trajectory.turns, turn_prompts):
            response = encode(turn.response_text) + eos
            following = encode(turn.target[:following_chars]) if dynamics else []
            play.append((rollout.encode_prompt(tokenizer, prompt), response + following))
    rng = np.random.default_rng(seed)
    world_model = []
    for triplet in rwml.triplets_from_rollouts(trajectories, game.history, game.world_model_view):
        prompt = rwml.world_model_prompt(triplet, direct=bool(rng.integers(2)))
        if not dynamics:
            triplet = triplet._replace(next_state=triplet.state)
        world_model.append((rollout.encode_prompt(tokenizer, prompt), encode(rwml.sft_label(triplet)) + eos))
    return play, world_model


def tau2_demonstrations(game: envs.Game, episodes: int, seed: int, detour: float = 0.25):
    """tau2-bench's transcripts for the embedded default, as rollout.random_play records them ([Trajectory],
    prompts): each episode a training task's gold conversation (envs.tau2.gold_actions) against the scripted
    customer, with, before each gold message, probability `detour` of a random read-only tool call drawn from the
    split's gold calls (so the model also sees calls that answer "Error: ... not found" or another customer's
    record)."""
    rng = np.random.default_rng(seed)
    env = game.make_env()
    env.score = False  # transcripts need no reward, and tau2's evaluation is most of an episode's time
    env.user_kind = "scripted"  # gold conversations are written for the scripted customer
    pool = [tau2.tool_call(a.name, dict(a.arguments)) for task in env.tasks
            for a in (task.evaluation_criteria.actions or []) if tau2.READ_ONLY.match(a.name)]
    trajectories, prompts = [], []
    for episode in range(episodes):
        reset_seed = int(rng.integers(1 << 30))
        observation, info = env.reset(reset_seed)
        plan = tau2.gold_actions(env.task, env.solo)
        actions = []
        for message in plan:
            if pool and rng.random() < detour:
                actions.append(pool[rng.integers(len(pool))])
            actions.append(message)
        trajectory = rollout.Trajectory(seed=reset_seed, group=episode, task=info["task"], initial_info=info, turns=[])
        prompts.append([])
        for step, action in enumerate(actions[:game.max_turns]):
            past = rollout.history_window(trajectory.turns, step, game.history)
            prompts[-1].append(game.prompt(trajectory.task, past, step, observation, info))
            following, reward, done, info = env.step(action)
            trajectory.turns.append(rollout.text_turn(game, step, observation, action, following, reward, done, info))
            observation = following
            if done:
                break
        trajectories.append(trajectory)
    return trajectories, prompts


def corpus(game: envs.Game, trajectories: Sequence[rollout.Trajectory], prompts: Sequence[Sequence[str]], size: int = 3000,
           seed: int = 0) -> list[str]:
    """Texts to train the tokenizer on: a sample of play turns (prompt, response, next observation) and
    of world-model examples (both prompts and the label), half each."""
    turns = [(turn, prompt) for trajectory, turn_prompts in zip(trajectories, prompts)
             for turn, prompt in zip(trajectory.turns, turn_prompts)]
    triplets = rwml.triplets_from_rollouts(trajectories, game.history, game.world_model_view)
    rng = np.random.default_rng(seed)
    texts = []
    for index in rng.choice(len(turns), min(size // 2, len(turns)), replace=False):
        turn, prompt = turns[index]
        texts += [prompt, turn.response_text, turn.target]
    for index in rng.choice(len(triplets), min(size // 2, len(triplets)), replace=False):
        triplet = triplets[index]
        texts += [rwml.world_model_prompt(triplet, direct=True), rwml.world_model_prompt(triplet), rwml.sft_label(triplet)]
    return texts + ["user\n", "assistant\n"] * 100  # the chat template's role names


def build(game: envs.Game, folder: str | Path, cfg: PretrainConfig = PretrainConfig(), log: Callable = print) -> Path:
    """Record random play, train the tokenizer and the tiny model, and save both to `folder`."""
    start = time.perf_counter()
    trajectories, prompts = (game.demonstrate or rollout.random_play)(game, cfg.episodes, cfg.seed)
    tokenizer = hf.train_tokenizer(corpus(game, trajectories, prompts, seed=cfg.seed), cfg.vocab_size)
    tokenizer.add_tokens(list(game.tokens))
    play, world_model = transcripts(game, trajectories, prompts, tokenizer, cfg.seed, cfg.dynamics, cfg.following_chars)
    if cfg.max_length is not None:
        play, world_model = ([(c, t) for c, t in examples if len(c) + len(t) <= cfg.max_length]
                             for examples in (play, world_model))
    config = lm.Config(
        model_type="qwen2", vocab_size=len(tokenizer), hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, num_layers=cfg.num_layers, num_heads=cfg.num_heads,
        num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, qkv_bias=True, tie_word_embeddings=True,
        max_position_embeddings=4096, eos_token_ids=(tokenizer.eos_token_id,),
    )
    log(f"pretraining the embedded default for {game.name}: {len(play)} play and {len(world_model)} world-model "
        f"transcripts from {cfg.episodes} "
        f"{'demonstration' if game.demonstrate else 'random-play'} episodes, a {len(tokenizer)}-token BPE ({time.perf_counter() - start:.0f} s so far)")
    optimizer = grpo.make_optimizer(cfg.learning_rate, weight_decay=0.0, schedule="cosine",
                                    warmup_steps=cfg.warmup_steps, total_steps=cfg.steps)
    state = grpo.init_state(lm.init_params(config, jax.random.key(cfg.seed)), optimizer)
    update = jax.jit(functools.partial(rwml.sft_step, model_config=config, optimizer=optimizer))

    def batches():
        rng = np.random.default_rng(cfg.seed)
        for _ in range(cfg.steps):
            if rng.random() < cfg.world_model_fraction:  # one kind a batch: similar lengths, similar cost
                examples, size = world_model, cfg.batch_size // 4
            else:
                examples, size = play, cfg.batch_size
            chosen = rng.choice(len(examples), min(size, len(examples)), replace=False)
            yield rwml.sft_batch(rollout.rows([examples[i][0] for i in chosen], [examples[i][1] for i in chosen],
                                              pad_id=tokenizer.pad_token_id, min_bucket=64))

    def report(step, state, metrics):
        if step % 100 == 0 or step == cfg.steps - 1:
            log(f"  pretraining step {step}: loss {metrics['loss']:.3f} ({time.perf_counter() - start:.0f} s)")

    state = rwml.train_sft(state, update, batches(), report)
    return hf.save_checkpoint(folder, config, state.params, tokenizer)


def embedded_default(game: envs.Game, cfg: PretrainConfig = PretrainConfig(), root: str | Path | None = None,
                     log: Callable = print) -> Path:
    """The cached checkpoint folder for this game and recipe, built on first use (atomically, and by one process:
    others asking for the same recipe meanwhile wait for it and reuse it)."""
    fields = dataclasses.asdict(cfg)
    for name, default in (("dynamics", True), ("max_length", None), ("following_chars", None)):  # added later: a
        if fields[name] == default:  # recipe at their defaults keeps the key (and cache) it had before
            del fields[name]
    if game.tokens:  # added later: a game without whole tokens keeps the key (and cache) it had before
        fields["tokens"] = list(game.tokens)
    recipe = json.dumps({"game": game.name, "prompt": game.prompt_name, "history": game.history,
                         "max_turns": game.max_turns, "version": RECIPE_VERSION, **fields}, sort_keys=True)
    folder = Path(root or hf.cache_root()) / f"{game.name}-{hashlib.sha256(recipe.encode()).hexdigest()[:12]}"
    if (folder / "config.json").exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(folder.with_name(folder.name + ".lock")):
        if (folder / "config.json").exists():  # built while this process waited
            return folder
        partial = folder.with_name(folder.name + f".partial-{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)
        build(game, partial, cfg, log)
        (partial / "recipe.json").write_text(recipe)
        partial.rename(folder)  # a folder appears whole or not at all, even if this process is killed
    return folder
