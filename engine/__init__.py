"""The engine: the machinery that makes the concepts one floor up run at scale, and that a reader of the papers can
leave closed. train.py composes the two; no concept module imports anything here.

    settings.py, checks.py   every setting, the recipes that fill those left unset, every input checked
    setup.py                 the game and the model a run's settings name (`prepare`: this package's public entry)
    run.py                   a run's folder, resume and position, and what follows every update
    checkpoints.py           Orbax checkpoints and the Hugging Face export
    logs.py                  metrics.jsonl, TensorBoard, the progress bar, curves.png
    sharding.py              the (data x fsdp) device mesh and the update placed on it
    microbatch.py            one update's gradient over length-sorted micro-batches of a token budget
    estimates.py             model FLOPs, the measured matmul peak, memory per token and free, the default budget
    hf.py, hf_format.py      Hugging Face checkpoints and tokenizers: resolved, loaded, saved, checked
    embedders.py             the sentence embedders RWML's reward compares in (MiniLM, Qwen3-Embedding)
    pretrain.py              the embedded default: a tiny Qwen2 pretrained offline on transcripts of random play
    evaluate.py              held-out task success (Pass@k) and world-model accuracy
"""

from engine.setup import Setup, prepare

__all__ = ["Setup", "prepare"]
