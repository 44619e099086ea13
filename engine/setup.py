"""What a run's settings name, made ready: the game (environment, prompt, parser), the model (the embedded default,
pretrained on first use, or a Hugging Face checkpoint), the device mesh, and the update's micro-batch size.

`prepare(args)` is the engine's one public entry for a notebook or a script that wants the pieces train.py uses
without running a method: `engine.prepare(train.Args(method="grpo"))`.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import jax

import envs
from envs import tau2
import model as lm
import multihost
import rollout
import rwml
import sampler
import spa
from engine import embedders, estimates, evaluate, hf, microbatch, pretrain, sharding
from engine.settings import GRID_SIZE, STAGES, Args, UsageError, settle


def make_game(args: Args) -> envs.Game:
    """The training game: its environment (ALFWorld's train split, or a grid game of --grid-size rendered as
    --observation says), the policy's prompt (--prompt), and its parser."""
    if args.env == "alfworld":
        make_env = functools.partial(envs.AlfWorld, "train", max_steps=max(args.max_turns, args.wm_max_turns))
        return envs.Game("alfworld", "verl-agent", make_env, envs.alfworld_prompt, lambda a: f"<action>{a}</action>",
                         envs.parse_action, args.history, args.max_turns)
    if args.env in envs.TAU2_ENVS:  # the compact prompt for the embedded default, tau2's policy and tools for a model
        compact = args.model is None
        make_env = functools.partial(envs.Tau2, args.env, "train", max_steps=max(args.max_turns, args.wm_max_turns),
                                     user="model" if args.user_model else "scripted")
        return envs.Game(args.env, "tau2-compact" if compact else "tau2", make_env, envs.tau2_prompt(args.env, compact),
                         tau2.respond, tau2.parse_message, args.history, args.max_turns,
                         tokens=tau2.call_tokens(args.env), demonstrate=pretrain.tau2_demonstrations,
                         world_model_view=compact_view if compact else None)
    short = args.prompt == "short" or (args.prompt == "auto" and args.model is None)
    state_estimation = args.state_estimation or args.method == "spa"  # SPA keeps state estimation on
    if args.prompt == "coordinates" or (short and args.method == "spa"):
        name, prompt = "grid+coordinates", lambda task, history, step, observation, info: spa.render_state(observation, info)
    elif short:
        name, prompt = "grid", lambda task, history, step, observation, info: observation
    else:
        name = f"ragen{'+coordinates' if state_estimation else ''}-{args.actions_per_turn}-actions"
        prompt = envs.grid_prompt(envs.GRID_ENVS[args.env].rules, state_estimation, args.actions_per_turn)
    size = f"{args.grid_size}x{args.grid_size}" if args.grid_size != GRID_SIZE[args.env] else ""
    observation = "-coordinates" if args.observation == "grid+coordinates" else ""  # the default keeps its name
    parse = functools.partial(envs.parse_answer, max_actions=args.actions_per_turn)
    return envs.Game(args.env + size + observation, name, grid_env(args, args.max_turns), prompt,
                     lambda a: f"<answer>{a}</answer>", parse, args.history, args.max_turns)


def compact_view(transition: rollout.Transition) -> rollout.Transition:
    """A tau2 transition as the embedded default's world-model prompt shows it: cut as its compact policy prompt cuts
    the same turns (envs.tau2.window, PRESENT_CUT); the next state, the label, stays whole. Whole, the prompt ran to
    ~3,400 tokens (median ~1,000) in the default's tokenizer; cut, the prompt and label to ~1,200 (median ~590)."""
    past = tau2.window(transition.history, transition.turn, False, tau2.PAST_CUT)
    return transition._replace(history=tuple((seen, action) for _, seen, action in past),
                               state=transition.state[:tau2.PRESENT_CUT])


def grid_env(args: Args, max_steps: int):
    """A grid game of --grid-size whose episodes end after max_steps actions (the turn cap), its observations
    rendered as --observation says."""
    game = envs.GRID_ENVS[args.env]
    if args.observation == "grid+coordinates":
        return functools.partial(envs.WithCoordinates, game, size=args.grid_size, max_steps=max_steps)
    return functools.partial(game, size=args.grid_size, max_steps=max_steps)


def held_out_game(args: Args, game: envs.Game) -> envs.Game:
    """The game evaluation plays: ALFWorld's evaluation split, or the grid game's episodes of --eval.max-turns."""
    if args.env == "alfworld":
        make_env = functools.partial(envs.AlfWorld, args.eval.split, max_steps=args.eval.max_turns)
    elif args.env in envs.TAU2_ENVS:
        make_env = functools.partial(envs.Tau2, args.env, "test", max_steps=args.eval.max_turns,
                                     user="model" if args.user_model else "scripted")
    else:
        make_env = grid_env(args, args.eval.max_turns)
    return dataclasses.replace(game, make_env=make_env)


def load_model(args: Args, game: envs.Game, log=print) -> tuple[Path, lm.Config, lm.Params, object]:
    """(folder, config, parameters, tokenizer) of --model, or of the embedded default for the game (pretrained on
    the first use, on --pretrain-observation's observations when given)."""
    if args.model is None:
        cfg = dataclasses.replace(pretrain.PretrainConfig(), episodes=args.pretrain_episodes, steps=args.pretrain_steps,
                                  dynamics=args.pretrain_dynamics)
        if args.env in envs.TAU2_ENVS:  # transcripts ~5x longer than a grid game's, and JSON needs more tokens. Every
            # transcript is kept (the longest ~1,200 tokens). World model: after ~100 steps of 8 none of 32 held-out
            # predictions closed <next_state>; 300 more, 28 of 32 (greedy). Play: after 100 steps of 32 (the 500-step
            # recipe of 4c69f69) greedy play wrote world-model text; 150 more took its loss from 0.92 to 0.38. At
            # temperature 1, in 16 training conversations, this recipe's default made 28 valid tool calls in 176 turns
            # (that of 4c69f69: 0 in 127). A play transcript's next observation is cut as the next prompt cuts it:
            # whole, most play batches padded to 2,048
            cfg = dataclasses.replace(cfg, batch_size=32, vocab_size=1024, max_length=1536, world_model_fraction=0.55,
                                      following_chars=tau2.PRESENT_CUT)
        if args.pretrain_observation not in (None, args.observation):  # pretrained on other observations than it meets
            game = make_game(dataclasses.replace(args, observation=args.pretrain_observation))
        folder = pretrain.embedded_default(game, cfg, args.cache, log)
    try:
        if args.model is not None:
            folder = hf.resolve_checkpoint(args.model, args.cache)
        config, params = hf.load_checkpoint(folder)
        tokenizer = hf.load_tokenizer(folder)
    except hf.CheckpointError as error:
        raise UsageError(str(error)) from error
    return folder, config, params, tokenizer


def check_context(args: Args, game: envs.Game, config: lm.Config, tokenizer) -> None:
    """Refuse a --model whose context cannot hold the game's first turn: the first training task's prompt through
    the chat template and --max-new-tokens after it, against the checkpoint's max_position_embeddings. Past it the
    rotary positions are ones the model never saw, and nothing would say so (tau2-telecom's policy and tools take
    10,782 tokens, SmolLM2-135M-Instruct's context is 8,192). A conversation that outgrows the context later ends
    there (rollout.rollout: Trajectory.context_full)."""
    observation, info = game.make_env().reset(args.seed)
    length = len(rollout.encode_prompt(tokenizer, game.prompt(info.get("task", ""), [], 0, observation, info)))
    if length + args.max_new_tokens > config.max_position_embeddings:
        raise UsageError(
            f"{args.env}'s first prompt is {length:,} tokens through {args.model}'s chat template, and --max-new-tokens "
            f"{args.max_new_tokens} after it make {length + args.max_new_tokens:,}: past the model's context of "
            f"{config.max_position_embeddings:,} tokens (max_position_embeddings in its config.json). Fix: a model "
            "with a longer context (Qwen2.5-Instruct, Qwen3: 32,768), or another --env.")


def update_tokens(args: Args, config: lm.Config, parameters: int, devices: int, chunk_size: int,
                  frozen: int = 0) -> tuple[int, str]:
    """--update-tokens, and why: the user's, or the largest micro-batch whose activations fit the memory free
    beside `frozen` parameters of other models held on the devices (the LLM judge) (estimates.default_update_tokens),
    agreed by every process of the run (each must cut its updates alike)."""
    if args.update_tokens is not None:
        return args.update_tokens, f"{args.update_tokens:,} tokens per device (--update-tokens)"
    reference = args.loss.beta > 0 or ("rwml" in STAGES[args.method] and args.wm_beta > 0)
    tokens, why = estimates.default_update_tokens(config, parameters, reference, devices, chunk_size, frozen)
    agreed = multihost.smallest(tokens)
    if agreed < tokens:
        tokens, why = agreed, f"{agreed:,} tokens per device (another process's memory)"
    return tokens, why


@dataclasses.dataclass
class Setup:
    """A run's pieces: the settings (settled, --update-tokens filled), the game, the model (its folder, config,
    parameters and tokenizer) and the device mesh."""

    args: Args
    game: envs.Game
    folder: Path
    config: lm.Config
    params: lm.Params
    tokenizer: object
    mesh: jax.sharding.Mesh
    update_tokens_why: str = ""
    judge: rwml.Judge | None = None
    """--judge-model's LLM judge of RWML's predictions (--wm-reward judge), its parameters on the mesh"""

    @property
    def pad_id(self) -> int:
        tokenizer = self.tokenizer
        return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def evaluator(self, **changes) -> evaluate.Evaluator:
        """The run's evaluation (make_evaluator), with evaluation settings changed by name, e.g. episodes=8."""
        args = dataclasses.replace(self.args, eval=dataclasses.replace(self.args.eval, **changes))
        return make_evaluator(args, self.game, self.tokenizer, self.config)

    def embedder(self):
        """E of RWML's reward, as --embedder names it (MiniLM by default)."""
        return embedders.make_embedder(self.args.embedder)

    def update(self, objective, optimizer) -> microbatch.LengthSortedUpdate:
        """train.py's update of an objective (grpo.grpo_objective, ...): its gradient summed over micro-batches of at
        most --update-tokens tokens, so a real model's update fits the memory."""
        return microbatch.LengthSortedUpdate(objective, optimizer, self.args.update_tokens)

    def load(self, folder: str | Path) -> lm.Params:
        """The parameters of another checkpoint of this model, e.g. a run's exported <out>/model."""
        config, params = hf.load_checkpoint(folder)
        if config != self.config:
            raise UsageError(f"{folder} holds another architecture than {self.folder}. Fix: load it with its own "
                             "settings (prepare(Args(model=...))).")
        return params


def make_evaluator(args: Args, game: envs.Game, tokenizer, config: lm.Config) -> evaluate.Evaluator:
    """The run's evaluation: the game's held-out tasks (ALFWorld: the evaluation split), parsed as in training."""
    return evaluate.Evaluator(args.eval, held_out_game(args, game), tokenizer, config,
                              max_new_tokens=args.max_new_tokens, spa_prediction=args.method == "spa",
                              seed=args.seed, workers=args.workers)


def load_other_model(flag: str, model: str, cache: str | None) -> tuple[lm.Config, lm.Params, object]:
    """(config, parameters, tokenizer) of a checkpoint that another flag than --model names (a folder, Hub id or GGUF
    file, converted under --cache); a fault is a UsageError naming the flag."""
    try:
        folder = hf.resolve_checkpoint(model, cache)
        config, params = hf.load_checkpoint(folder)
        return config, params, hf.load_tokenizer(folder)
    except (hf.CheckpointError, FileNotFoundError, OSError) as error:
        raise UsageError(f"{flag} {model}: {error}") from error


def load_user_model(args: Args) -> rollout.UserModel:
    """--user-model, the customer of a tau2-bench conversation: a Hugging Face checkpoint sampled greedily, its
    messages at most 128 tokens."""
    config, params, tokenizer = load_other_model("--user-model", args.user_model, args.cache)
    user = rollout.UserModel(params, config, tokenizer)
    return user._replace(sampling=sized_to_memory(user.sampling))


def load_judge(args: Args, mesh: jax.sharding.Mesh) -> rwml.Judge:
    """--judge-model, the LLM judge of --wm-reward judge: a Hugging Face checkpoint held as the policy is, its
    parameters sharded FSDP-style over the mesh (a judge can be as large as the policy), sampled greedily."""
    config, params, tokenizer = load_other_model("--judge-model", args.judge_model, args.cache)
    judge = rwml.Judge(sharding.place(params, mesh), config, tokenizer)
    return judge._replace(sampling=sized_to_memory(judge.sampling))


def sized_to_memory(sampling: sampler.SamplingParams) -> sampler.SamplingParams:
    """A model's sampling beside the policy (the judge, the user model), its batches sized to a quarter of the memory
    free now: it is loaded before the training state is in place."""
    return dataclasses.replace(sampling, batch_bytes=estimates.sampling_bytes(share=4))


def prepare(args: Args, chunk_size: int = 512, log=print) -> Setup:
    """The game, the model and the mesh that args name, with --update-tokens settled for an update whose log-probs
    take chunk_size tokens a vocabulary chunk (grpo.StepConfig.chunk_size). args need not be settled yet."""
    args = settle(args)
    game = make_game(args)
    folder, config, params, tokenizer = load_model(args, game, log)
    if args.env in envs.TAU2_ENVS and args.model is not None and tau2.renders_tools(tokenizer):
        game = dataclasses.replace(game, prompt=envs.tau2_chat_prompt(args.env), prompt_name="tau2-chat")
    if args.model is not None:  # the embedded default is pretrained on its own game's prompts
        check_context(args, game, config, tokenizer)
    if args.user_model:
        game = dataclasses.replace(game, user=load_user_model(args))
    mesh = sharding.make_mesh(args.mesh_data, args.mesh_fsdp)
    judge = load_judge(args, mesh) if args.wm_reward == "judge" else None
    frozen = lm.count_params(judge.params) if judge is not None else 0
    tokens, why = update_tokens(args, config, lm.count_params(params), mesh.size, chunk_size, frozen)
    return Setup(dataclasses.replace(args, update_tokens=tokens), game, folder, config, params, tokenizer, mesh, why,
                 judge)
